"""A label with fewer images than one episode needs is named, with its files: warned or refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.site import check_episode_classes
from medmeta.cli import main
from medmeta_common.config import DataConfig
from medmeta_common.errors import DataError


@pytest.fixture
def typo_site(tmp_path: Path) -> Path:
    """Two real classes of 16 images, and one image filed under a typo'd label."""
    rng = np.random.default_rng(0)
    root = tmp_path / "site"
    for label, count in (("glioma", 16), ("meningioma", 16), ("osteosarcoma", 1)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, size=(24, 24), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"scan{i:02d}.png")
    return root


def test_inspect_names_the_file_of_a_one_image_class(
        typo_site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "inspect", str(typo_site)]) == 0
    out = capsys.readouterr().out
    assert ("warning: class 'osteosarcoma' has 1 image(s), fewer than the 15 one episode "
            "needs (K+Q): osteosarcoma/scan00.png") in out
    assert "'glioma'" not in out  # 16 images serve a 5-shot, 10-query episode

    assert main(["data", "inspect", str(typo_site), "--json", "--shots", "10"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(c["class"], c["images"], c["needed"]) for c in report["sparse_classes"]] == [
        ("glioma", 16, 20), ("meningioma", 16, 20), ("osteosarcoma", 1, 20)]


def test_strict_inspect_refuses_the_class(typo_site: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "inspect", str(typo_site), "--policy", "strict"])
    assert code == DataError.exit_code
    err = capsys.readouterr().err
    assert "class 'osteosarcoma' has 1 image(s)" in err and "osteosarcoma/scan00.png" in err


def test_site_preflight_warns_when_lenient_and_stops_when_strict(
        typo_site: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        check_episode_classes(DataConfig(path=str(typo_site), split=None), "classification",
                              "hospital-a")
    assert "site hospital-a" in caplog.text and "osteosarcoma/scan00.png" in caplog.text
    with pytest.raises(DataError, match=r"osteosarcoma/scan00\.png"):
        check_episode_classes(DataConfig(path=str(typo_site), split=None, policy="strict"),
                              "classification", "hospital-a")
