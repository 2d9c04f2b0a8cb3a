"""A DICOM site folder written from the real brain-MRI arrays: ingest, bad files, privacy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medmeta.dicom_export import IDENTIFYING, write_dicom_site
from medmeta_common.config import DataConfig, ImageConfig
from medmeta_common.data.sources import load_site, read_raw
from medmeta_common.errors import DataError

CLI = [sys.executable, "-m", "medmeta.cli"]
PER_CLASS = 12


@pytest.fixture
def dicom_site(tmp_path: Path, brain_npz: Path) -> tuple[Path, np.ndarray, np.ndarray, list[str]]:
    """48 real MR slices as DICOM, 4 patients per class, with a manifest."""
    with np.load(brain_npz) as raw:
        classes = [str(c) for c in raw["classes"]]
        index = np.concatenate([np.flatnonzero(raw["test_labels"] == c)[:PER_CLASS]
                                for c in range(len(classes))])
        images, labels = raw["test_images"][index], raw["test_labels"][index]
    patients = [f"P{label}{i // 3:02d}" for i, label in enumerate(labels)]
    root = write_dicom_site(tmp_path / "site", images, labels, classes, patients)
    return root, images, labels, classes


def test_ingest_returns_the_same_pixels_labels_and_patients(dicom_site) -> None:
    root, images, labels, classes = dicom_site
    site = read_raw(DataConfig(path=str(root), split=None, policy="strict"))
    assert site.format == "manifest" and not site.issues
    assert site.classes == tuple(sorted(classes))
    got = {r.ref: r for r in site.records}
    assert len(got) == len(images)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        record = next(r for ref, r in got.items() if ref.endswith(f"img{i:05d}.dcm"))
        np.testing.assert_array_equal(record.pixels[0], image.astype(np.float32))
        assert site.classes[record.label] == classes[int(label)]
        assert record.modality == "MR"
    assert len({r.group for r in site.records}) == len(images) // 3


def test_dicom_splits_keep_patients_together(dicom_site) -> None:
    root = dicom_site[0]
    groups = {s: {r.group for r in read_raw(DataConfig(path=str(root), split=s)).records}
              for s in ("train", "val", "test")}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"]
                or groups["val"] & groups["test"])
    assert sum(len(g) for g in groups.values()) == 16


def test_harmonised_site_matches_config(dicom_site) -> None:
    site = load_site(DataConfig(path=str(dicom_site[0]), split=None), ImageConfig(size=32))
    assert site.images.shape == (4 * PER_CLASS, 1, 32, 32)


def corrupt(root: Path) -> list[str]:
    """Damage three files and add two bad manifest rows; return what must be named."""
    files = sorted(root.rglob("*.dcm"))
    files[0].write_bytes(files[0].read_bytes()[:700])                   # truncated
    files[5].write_bytes(b"this is not a DICOM file at all" * 10)       # not DICOM
    data = bytearray(files[9].read_bytes())
    data[128:132] = b"XXXX"                                           # preamble destroyed
    files[9].write_bytes(bytes(data))
    with (root / "manifest.csv").open("a") as handle:
        handle.write("P999/missing.dcm,no_tumor,P999\n")
        handle.write(f"{files[1].relative_to(root).as_posix()},not_a_class,P000\n")
    return [f.relative_to(root).as_posix() for f in (files[0], files[5], files[9])] + [
        "P999/missing.dcm", files[1].relative_to(root).as_posix()]


def test_lenient_names_each_bad_file_and_carries_on(dicom_site) -> None:
    root = dicom_site[0]
    bad = corrupt(root)
    classes = ",".join(dicom_site[3])
    result = subprocess.run([*CLI, "data", "inspect", str(root), "--json", "--classes", classes],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    named = [e["file"] for e in report["errors"]]
    assert sorted(named) == sorted(bad)
    assert report["images"] == 4 * PER_CLASS - 3
    reasons = {e["file"]: e["reason"] for e in report["errors"]}
    assert "not in the class list" in reasons[bad[4]]
    assert "not found" in reasons["P999/missing.dcm"]
    assert "Traceback" not in result.stderr


def test_strict_fails_at_the_first_bad_file(dicom_site) -> None:
    root = dicom_site[0]
    bad = corrupt(root)
    with pytest.raises(DataError) as info:
        read_raw(DataConfig(path=str(root), split=None, policy="strict",
                            classes=tuple(dicom_site[3])))
    assert info.value.file == bad[0]
    result = subprocess.run([*CLI, "data", "inspect", str(root), "--policy", "strict"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 3
    assert bad[0] in result.stderr and "strict" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_inspect_output_has_no_identifying_fields(dicom_site) -> None:
    root = dicom_site[0]
    corrupt(root)
    import pydicom

    sample = pydicom.dcmread(sorted(root.rglob("*.dcm"))[-1])
    secrets = [*IDENTIFYING.values(), str(sample.PatientID), str(sample.SOPInstanceUID),
               str(sample.StudyInstanceUID), "Doe", "Jane"]
    for extra in ([], ["--json"]):
        result = subprocess.run([*CLI, "data", "inspect", str(root), *extra],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0
        for secret in secrets:
            assert secret not in result.stdout, secret
            assert secret not in result.stderr, secret


def test_manifest_errors(tmp_path: Path, dicom_site) -> None:
    root = dicom_site[0]
    (root / "manifest.csv").write_text("path,label\nx.dcm,a\n")
    with pytest.raises(DataError, match="missing column"):
        read_raw(DataConfig(path=str(root), split=None))
    (root / "manifest.csv").write_text("file,label,patient_id\n../../etc/passwd,a,P1\n")
    site = read_raw(DataConfig(path=str(root), split=None))
    assert "leaves the site folder" in site.issues[0].reason
    shutil.rmtree(root)
    with pytest.raises(DataError, match="no such file or folder"):
        read_raw(DataConfig(path=str(root), split=None))
