"""adapt / predict / the notebook API on real images, from a meta-model checkpoint."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmeta.dicom_export import write_mr
from medmeta_common.checkpoint import checkpoint_payload
from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.errors import CheckpointError
from medmeta_common.models.factory import build_encoder
from server.state import RunState
from tests.conftest import ROOT

CLI = [sys.executable, "-m", "medmeta.cli"]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory holding one meta-model checkpoint (an untrained encoder)."""
    image, model = ImageConfig(size=32, channels=1), ModelConfig()
    encoder = build_encoder(model, image, seed=0)
    out = tmp_path / "run"
    RunState(out).save_checkpoint(1, checkpoint_payload(
        round_number=1, encoder_state={k: v.numpy() for k, v in encoder.state_dict().items()},
        image=asdict(image), model=asdict(model), config_hash="test", federation="test"))
    return out


def adapt_json(run_dir: Path, data: Path, *extra: str) -> dict:
    result = subprocess.run([*CLI, "adapt", "--checkpoint", str(run_dir), "--data", str(data),
                             "--json", *extra], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(("relative", "split", "ways"), [
    ("pbc_blood/pbc_blood_5class_28.npz", "test", 3),        # RGB, labels (N, 1), 5 classes
    ("medmnist/pneumoniamnist_28.npz", "test", 2),           # grey, labels (N, 1)
    ("medmnist/breastmnist_28.npz", "val", 2),               # grey, labels (N,)
])
def test_adapt_json_on_unseen_npz(run_dir: Path, relative: str, split: str, ways: int) -> None:
    from tests.conftest import shared_file

    report = adapt_json(run_dir, shared_file(relative), "--split", split, "--ways", str(ways),
                        "--shots", "5", "--queries", "5", "--episodes", "30")
    assert list(report) == ["accuracy_mean", "accuracy_ci95", "ways", "shots", "episodes"]
    assert (report["ways"], report["shots"], report["episodes"]) == (ways, 5, 30)
    assert 0.0 <= report["accuracy_mean"] <= 1.0 and report["accuracy_ci95"] > 0


def test_adapt_finetuning_modes(run_dir: Path, brain_npz: Path) -> None:
    common = ["--split", "test", "--ways", "2", "--shots", "3", "--queries", "5",
              "--episodes", "5", "--finetune-steps", "5"]
    for mode in ("head", "all"):
        report = adapt_json(run_dir, brain_npz, *common, "--finetune", mode)
        assert report["episodes"] == 5


def test_too_few_classes_is_a_clear_error(run_dir: Path, breast_npz: Path) -> None:
    result = subprocess.run([*CLI, "adapt", "--checkpoint", str(run_dir), "--data",
                             str(breast_npz), "--ways", "3", "--shots", "5"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 3
    assert "need 3 classes" in result.stderr and "Traceback" not in result.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, breast_npz: Path) -> None:
    result = subprocess.run([*CLI, "adapt", "--checkpoint", str(tmp_path), "--data",
                             str(breast_npz), "--ways", "2", "--shots", "1"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == CheckpointError.exit_code
    assert "no checkpoint found" in result.stderr


def brain_png_site(root: Path, brain_npz: Path, per_class: int = 8) -> Path:
    with np.load(brain_npz) as raw:
        images, labels, classes = raw["test_images"], raw["test_labels"], raw["classes"]
    for c, name in enumerate(classes):
        folder = root / str(name)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            Image.fromarray(images[i]).save(folder / f"{i}.png")
    return root


def test_save_then_predict_a_mixed_folder(run_dir: Path, brain_npz: Path, tmp_path: Path) -> None:
    site = brain_png_site(tmp_path / "site", brain_npz)
    model_dir = tmp_path / "model"
    adapt_json(run_dir, site, "--ways", "2", "--shots", "3", "--queries", "3", "--episodes", "5",
               "--save", str(model_dir))
    info = json.loads((model_dir / "adapted_model.json").read_text())
    assert info["classes"] == sorted(info["classes"]) and len(info["classes"]) == 4

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    with np.load(brain_npz) as raw:
        Image.fromarray(raw["test_images"][200]).save(inputs / "scan.png")
        write_mr(inputs / "nested" / "slice.dcm", raw["test_images"][300].astype(np.uint16) * 8,
                 patient_id="P1")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "predictions.csv"
    result = subprocess.run([*CLI, "predict", "--model", str(model_dir), "--input", str(inputs),
                             "--out", str(out)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    by_file = {r["file"]: r for r in rows}
    assert set(by_file) == {"broken.png", "nested/slice.dcm", "scan.png"}
    assert by_file["broken.png"]["error"] and not by_file["broken.png"]["prediction"]
    for name in ("scan.png", "nested/slice.dcm"):
        row = by_file[name]
        probs = [float(row[f"p_{c}"]) for c in info["classes"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["prediction"] == info["classes"][int(np.argmax(probs))]
    assert "Traceback" not in result.stderr


def test_notebook_example_runs(run_dir: Path) -> None:
    example = ROOT / "docs" / "examples" / "notebook_api.py"
    result = subprocess.run([sys.executable, str(example), str(run_dir), "builtin:demo/site-3"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "3-way 5-shot:" in result.stdout
    assert "classes: ('spots', 'stripes', 'crescent', 'checker')" in result.stdout


@pytest.mark.slow
def test_readme_main_job_runs(tmp_path: Path) -> None:
    """The quick start's first command, shortened to one round."""
    out = tmp_path / "demo"
    result = subprocess.run([*CLI, "simulate", "--rounds", "1", "--out", str(out)],
                            capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "New site new-hospital: 4-way 5-shot accuracy" in result.stdout
    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "| hospital-a | on |" in report
    assert "Traceback" not in result.stderr
