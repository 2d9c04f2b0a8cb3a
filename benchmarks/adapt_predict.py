"""Time to adapt at a new site, and predict throughput on DICOM, beside their baselines.

- ``adapt``: 5-way 5-shot, prototypes only, from a checkpoint and 25 labelled PNG images
  (real blood-cell images in class folders) to a saved classifier, including model
  load: the whole ``medmeta adapt --save`` command in a fresh process (wall time, with
  the Python imports), and the same work in-process after the imports.
- ``predict``: images/s for a folder of real brain-MRI slices written as DICOM,
  beside bare ``pydicom.dcmread(...).pixel_array`` of the same files in the same run.

    python benchmarks/adapt_predict.py            # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pydicom
import torch
from PIL import Image

from client.meta_model import load_meta_model
from client.tasks.classification_adapt import adapt, load_adapted, save_adapted
from client.tasks.classification_predict import predict
from medmeta.dicom_export import write_mr
from medmeta_common.checkpoint import atomic_torch_save, checkpoint_payload
from medmeta_common.config import DataConfig, ImageConfig, ModelConfig
from medmeta_common.data.images import input_files
from medmeta_common.data.sources import load_site
from medmeta_common.models.factory import build_encoder

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def write_checkpoint(path: Path) -> None:
    image, model = ImageConfig(), ModelConfig()
    encoder = build_encoder(model, image, 0)
    atomic_torch_save(path, checkpoint_payload(
        round_number=1, encoder_state={k: v.numpy() for k, v in encoder.state_dict().items()},
        image=asdict(image), model=asdict(model), config_hash="benchmark",
        federation="benchmark", server_optimizer={}))


def write_shots(folder: Path, per_class: int) -> None:
    """``per_class`` images of each of 5 blood-cell classes, as PNG class folders."""
    data = np.load(DATA / "pbc_blood" / "pbc_blood_5class_28.npz", allow_pickle=False)
    images, labels = data["test_images"], data["test_labels"].ravel()
    for c, name in enumerate(data["classes"]):
        for i, index in enumerate(np.flatnonzero(labels == c)[:per_class]):
            (folder / str(name)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / str(name) / f"{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dicom-files", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# adapt and predict: torch {torch.__version__}, {platform.machine()}, 1 thread")
    with tempfile.TemporaryDirectory(prefix="medmeta-adapt-") as tmp:
        folder = Path(tmp)
        checkpoint = folder / "round-0001.pt"
        write_checkpoint(checkpoint)
        write_shots(folder / "shots", 5)
        # The command scores one episode before saving, so it needs a query per class.
        write_shots(folder / "shots_cli", 6)

        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "medmeta.cli", "-q", "adapt", "--checkpoint",
                        str(checkpoint), "--data", str(folder / "shots_cli"), "--ways", "5",
                        "--shots", "5", "--episodes", "1", "--queries", "1",
                        "--save", str(folder / "cli_model")],
                       check=True, capture_output=True, cwd=ROOT)
        cli_seconds = time.monotonic() - started
        started = time.monotonic()
        meta = load_meta_model(checkpoint)
        site = load_site(DataConfig(path=str(folder / "shots"), split=None), meta.image)
        save_adapted(adapt(meta, site), folder / "model")
        in_process = time.monotonic() - started
        print(f"adapt 5-way 5-shot, prototypes, model load to saved classifier: "
              f"{in_process:.2f} s in-process; whole command in a fresh process "
              f"{cli_seconds:.2f} s (target 5 s)")

        brain = np.load(DATA / "brain_tumor_mri" / "brain_tumor_mri_64.npz",
                        allow_pickle=False)["test_images"]
        dicom = folder / "dicom"
        for i in range(args.dicom_files):
            write_mr(dicom / f"{i:05d}.dcm", brain[i % len(brain)].astype(np.uint16) * 16,
                     patient_id=f"p{i % 40}")
        files = input_files(dicom)
        started = time.monotonic()
        for f in files:
            _ = pydicom.dcmread(f).pixel_array
        bare = len(files) / (time.monotonic() - started)
        model = load_adapted(folder / "model")
        started = time.monotonic()
        predictions = predict(model, files, root=dicom)
        rate = len(files) / (time.monotonic() - started)
        assert all(p.error is None for p in predictions)
        print(f"predict on {len(files)} DICOM files (64x64 MR): {rate:.0f} images/s; "
              f"baseline bare pydicom decode of the same files: {bare:.0f} images/s")


if __name__ == "__main__":
    main()
