"""A multi-task federation on real data: classification, segmentation and detection sites.

Two brain-MRI classification sites, two segmentation sites (EM membranes, tiled; MR
tumour/lesion volumes, sliced) and a detection site (BCCD blood smears, tiled) run a
short simulation under DP, one shared encoder; then a held-out segmentation site
(nuclei) adapts with `medmeta adapt --task segmentation` and `medmeta predict` writes
masks that standard readers open, and a held-out detection site (BCCD test slides)
adapts with `medmeta adapt --task detection` and predicts boxes and overlays.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flwr.app import Message
from PIL import Image

from medmeta.simulate import run_simulation
from medmeta_common.config import load_config
from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger
from medmeta_common.protocol import EVALUATE_METRICS, TRAIN_METRICS
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
server: {{min_sites: 5}}
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
  - name: blood-lab
    task: detection
    tile: 240
    data: {{path: {data}/bccd/BCCD, split: train, partition: {{parts: 6, index: 0}}}}
"""


@dataclass
class Run:
    out: Path
    replies: list[Message]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    shared_file("segmentation/em_membrane")
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    shared_file("bccd/BCCD")
    tmp = tmp_path_factory.mktemp("multitask")
    path = tmp / "multitask.yaml"
    path.write_text(CONFIG.format(data=SHARED_DATA))
    replies = run_simulation(load_config(path), tmp / "run").replies
    return Run(tmp / "run", replies)


@pytest.fixture(scope="module")
def run_dir(run: Run) -> Path:
    return run.out


def records(run_dir: Path, phase: str) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["phase"] == phase]


def test_all_four_sites_meta_update_the_one_encoder_under_dp(run_dir: Path) -> None:
    train = records(run_dir, "train")
    assert [r["round"] for r in train] == [1, 2]
    for record in train:
        assert record["accepted"] == 5
        for name in ("em-lab", "mr-seg", "blood-lab"):
            site = record["sites"][name]
            assert site["status"] == "accepted" and site["dp"] == 1 and site["epsilon"] > 0
    for name, local in (("em-lab", "decoder.pt"), ("mr-seg", "decoder.pt"),
                        ("blood-lab", "detection_head.pt")):
        ledger = read_ledger(run_dir / "sites" / name / LEDGER_FILE)
        assert len(ledger.rounds) == 2 and ledger.epsilon <= 8.0
        assert (run_dir / "sites" / name / local).exists()  # stays at the site


def test_segmentation_sites_report_dice_and_classification_sites_accuracy(
        run_dir: Path) -> None:
    last = records(run_dir, "evaluate")[-1]["sites"]
    assert 0.0 <= last["em-lab"]["dice"] <= 1.0 and "accuracy" not in last["em-lab"]
    assert 0.0 <= last["brain-a"]["accuracy"] <= 1.0
    assert 0.0 <= last["blood-lab"]["map"] <= last["blood-lab"]["map50"] <= 1.0
    assert "accuracy" not in last["blood-lab"] and "dice" not in last["blood-lab"]


def test_every_site_of_every_task_sends_only_the_encoder_and_allowed_metrics(run: Run) -> None:
    evaluated = set()
    in_train: set[int] = set()
    for reply in run.replies:
        assert not reply.has_error(), reply.error.reason
        if reply.metadata.message_type == "query":
            continue
        metrics = dict(reply.content.metric_records["metrics"])
        allowed = TRAIN_METRICS if reply.metadata.message_type == "train" else EVALUATE_METRICS
        assert set(metrics) <= allowed, metrics
        assert not reply.content.config_records
        assert set(reply.content) <= {"arrays", "metrics", "validation"}
        if "validation" in reply.content:  # the received encoder, scored in a train reply
            assert reply.metadata.message_type == "train"
            validation = dict(reply.content.metric_records["validation"])
            assert set(validation) <= EVALUATE_METRICS, validation
            metrics.update(validation)
            in_train.add(reply.metadata.src_node_id)
        if "map50" in metrics:
            evaluated.add("detection")
        if "dice" in metrics:
            evaluated.add("segmentation")
    assert evaluated == {"detection", "segmentation"}
    assert len(in_train) == 5  # every site validated in a train reply: one message a round


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


def test_held_out_detection_site_adapts_and_predicts_boxes_and_overlays(
        run_dir: Path, tmp_path: Path) -> None:
    bccd = shared_file("bccd/BCCD")
    result = subprocess.run(
        [*CLI, "adapt", "--task", "detection", "--checkpoint", str(run_dir), "--data",
         str(bccd), "--split", "test", "--tile", "240", "--shots", "3", "--episodes", "2",
         "--finetune-steps", "40", "--json", "--save", str(tmp_path / "model")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"map50_mean", "map50_ci95", "shots", "episodes"} <= set(report)
    assert report["shots"] == 3 and report["episodes"] == 2
    assert 0 <= report["map50_mean"] <= 1

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("BloodImage_00007.jpg", "BloodImage_00012.jpg"):
        (inputs / name).write_bytes((bccd / "JPEGImages" / name).read_bytes())
    (inputs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "boxes"
    result = subprocess.run([*CLI, "predict", "--model", str(tmp_path / "model"), "--input",
                             str(inputs), "--out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    coco = json.loads((out / "boxes.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == ["BloodImage_00007.jpg",
                                                        "BloodImage_00012.jpg"]
    assert {c["name"] for c in coco["categories"]} == {"Platelets", "RBC", "WBC"}
    assert coco["errors"][0]["file"] == "broken.png"
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 640.5 and y + h <= 480.5 and w >= 0 and h >= 0
    rows = (out / "boxes.csv").read_text().splitlines()
    assert rows[0] == "file,x_min,y_min,x_max,y_max,label,score,error"
    assert any(r.startswith("broken.png,") and r.split(",")[-1] for r in rows)
    overlay = Image.open(out / "overlays" / "BloodImage_00007_boxes.png")
    assert overlay.size == (640, 480) and overlay.mode == "RGB"
