"""DICOM ingestion speed: decode (+ LUTs, checks) and MONAI harmonisation, images/s.

Baseline, measured in the same run: bare ``pydicom.dcmread(...).pixel_array`` on the
same files (no LUTs, no validation, no resizing).

    python benchmarks/ingest.py            # quick (~1 min on 2 CPU cores)
    python benchmarks/ingest.py --full     # more files and repetitions
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from medmeta.dicom_export import write_dicom_site
from medmeta_common.config import DataConfig, ImageConfig
from medmeta_common.data.dicom import read_dicom
from medmeta_common.data.sources import load_site

COMPRESSED = {
    "JPEG 2000 lossless (MR 64x64)": "MR_small_jp2klossless.dcm",
    "JPEG-LS lossless (MR 64x64)": "MR_small_jpeg_ls_lossless.dcm",
    "JPEG baseline (RGB 100x100)": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG 2000 (NM 1024x256)": "JPEG2000.dcm",
    "RLE (MR 64x64)": "MR_small_RLE.dcm",
    "uncompressed CT 128x128": "CT_small.dcm",
}


def rate(paths: list[Path], fn) -> float:
    start = time.perf_counter()
    for path in paths:
        fn(path)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    copies = 400 if args.full else 100
    print(f"# ingest benchmark  python {platform.python_version()}  {platform.machine()}  "
          f"cpus={__import__('os').cpu_count()}")
    print(f"{'files':<30} {'n':>5} {'pydicom bare':>14} {'medmeta decode':>15} {'ratio':>6}")
    work = Path(tempfile.mkdtemp(prefix="medmeta-ingest-"))
    try:
        for label, name in COMPRESSED.items():
            source = get_testdata_file(name)
            if source is None:
                print(f"{label:<30} (test file {name} not installed)")
                continue
            paths = []
            for i in range(copies):
                path = work / label.replace(" ", "_") / f"{i}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, path)
                paths.append(path)
            bare = rate(paths, lambda p: pydicom.dcmread(p).pixel_array)
            ours = rate(paths, lambda p: read_dicom(p))
            print(f"{label:<30} {copies:>5} {bare:>11.0f}/s {ours:>12.0f}/s {ours / bare:>6.2f}")

        brain = args.data / "brain_tumor_mri" / "brain_tumor_mri_64.npz"
        if brain.exists():
            n = 2000 if args.full else 600
            with np.load(brain) as raw:
                images, labels = raw["train_images"][:n], raw["train_labels"][:n]
                classes = [str(c) for c in raw["classes"]]
            site = write_dicom_site(work / "site", images.astype(np.uint16) * 16, labels,
                                    classes, [f"P{i // 4}" for i in range(n)])
            paths = sorted(site.rglob("*.dcm"))
            bare = rate(paths, lambda p: pydicom.dcmread(p).pixel_array)
            # Warm-up outside the timing: the first call imports MONAI's transforms.
            load_site(DataConfig(path="builtin:demo/site-0", split=None), ImageConfig(size=32))
            start = time.perf_counter()
            data = load_site(DataConfig(path=str(site), split=None, policy="strict"),
                             ImageConfig(size=32, channels=1))
            full = len(data) / (time.perf_counter() - start)
            print(f"\nDICOM site from real brain MRI ({n} MR slices 64x64, manifest):")
            print(f"  pydicom bare decode                     {bare:8.0f} images/s (baseline)")
            print(f"  medmeta load_site (decode + LUTs + checks + MONAI resize/normalise) "
                  f"{full:8.0f} images/s ({full / bare:.2f}x baseline)")
        else:
            print(f"(real data not found at {brain}: DICOM site benchmark skipped)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
