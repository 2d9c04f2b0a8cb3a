"""A multi-task federation on real data: classification and segmentation sites, one encoder.

Two brain-MRI classification sites and two segmentation sites (EM membranes, tiled;
MR tumour/lesion volumes, sliced) run a short simulation under DP in Flower's engine;
then a held-out segmentation site (nuclei) adapts with `medmeta adapt --task
segmentation` and `medmeta predict` writes masks that standard readers open.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medmeta.simulate import run_simulation
from medmeta_common.config import load_config
from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger
from tests.conftest import SHARED_DATA, shared_file

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "medmeta.cli"]

CONFIG = """
name: multitask-ci
seed: 0
rounds: 2
image: {{size: 32, channels: 1}}
train: {{local_steps: 4, batch_size: 16, lr: 0.03}}
privacy: {{epsilon: 8.0}}
server: {{min_sites: 4}}
evaluation: {{ways: 2, shots: 3, queries: 5, episodes: 5}}
sites:
  - name: brain-a
    data: {{path: {data}/brain_tumor_mri/brain_tumor_mri_64.npz, partition: {{parts: 8, index: 0}}}}
  - name: brain-b
    data: {{path: {data}/brain_tumor_mri/brain_tumor_mri_64.npz, partition: {{parts: 8, index: 1}}}}
  - name: em-lab
    task: segmentation
    data: {{path: {data}/segmentation/em_membrane}}
  - name: mr-seg
    task: segmentation
    data: {{path: {data}/segmentation/brain_breast_mr}}
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared_file("segmentation/em_membrane")
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    tmp = tmp_path_factory.mktemp("multitask")
    path = tmp / "multitask.yaml"
    path.write_text(CONFIG.format(data=SHARED_DATA))
    run_simulation(load_config(path), tmp / "run")
    return tmp / "run"


def records(run_dir: Path, phase: str) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["phase"] == phase]


def test_all_four_sites_meta_update_the_one_encoder_under_dp(run_dir: Path) -> None:
    train = records(run_dir, "train")
    assert [r["round"] for r in train] == [1, 2]
    for record in train:
        assert record["accepted"] == 4
        for name in ("em-lab", "mr-seg"):
            site = record["sites"][name]
            assert site["status"] == "accepted" and site["dp"] == 1 and site["epsilon"] > 0
    for name in ("em-lab", "mr-seg"):
        ledger = read_ledger(run_dir / "sites" / name / LEDGER_FILE)
        assert len(ledger.rounds) == 2 and ledger.epsilon <= 8.0
        assert (run_dir / "sites" / name / "decoder.pt").exists()  # stays at the site


def test_segmentation_sites_report_dice_and_classification_sites_accuracy(
        run_dir: Path) -> None:
    last = records(run_dir, "evaluate")[-1]["sites"]
    assert 0.0 <= last["em-lab"]["dice"] <= 1.0 and "accuracy" not in last["em-lab"]
    assert 0.0 <= last["brain-a"]["accuracy"] <= 1.0


def test_held_out_segmentation_site_adapts_and_predicts_readable_masks(
        run_dir: Path, tmp_path: Path) -> None:
    nuclei = shared_file("segmentation/nuclei")
    result = subprocess.run(
        [*CLI, "adapt", "--task", "segmentation", "--checkpoint", str(run_dir), "--data",
         str(nuclei), "--shots", "3", "--episodes", "3", "--finetune-steps", "30", "--json",
         "--save", str(tmp_path / "model")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"dice_mean", "dice_ci95", "shots", "episodes"}
    assert report["shots"] == 3 and report["episodes"] == 3 and 0 <= report["dice_mean"] <= 1

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "cells.tif").write_bytes((nuclei / "img2d.tif").read_bytes())
    volume = SHARED_DATA / "segmentation" / "brain_breast_mr" / "breast1_image.nrrd"
    (inputs / "breast.nrrd").write_bytes(volume.read_bytes())
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "masks"
    result = subprocess.run([*CLI, "predict", "--model", str(tmp_path / "model"), "--input",
                             str(inputs), "--out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    png = np.asarray(Image.open(out / "cells_mask.png"))
    assert png.shape == (512, 512) and set(np.unique(png)) <= {0, 255}
    nifti = nib.load(str(out / "breast_mask.nii.gz"))
    assert nifti.shape == (45, 120, 21)  # the input volume's own geometry
    summary = (out / "masks.csv").read_text()
    assert "broken.png" in summary and "cells_mask.png" in summary
