"""Write arrays as real DICOM files (MR Image Storage) with a manifest: a DICOM site.

For demos, ingestion benchmarks and tests. The identifying tags are filled with
obviously fake values (:data:`IDENTIFYING`), so that checks that nothing identifying
is ever printed or sent have something to find.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

IDENTIFYING = {
    "PatientName": "Doe^Jane",
    "PatientBirthDate": "19610704",
    "StudyDate": "20240131",
    "InstitutionName": "St Elsewhere General",
    "AccessionNumber": "ACC99817",
}


def write_mr(path: Path, pixels: np.ndarray, *, patient_id: str, slope: float = 1.0,
             intercept: float = 0.0, photometric: str = "MONOCHROME2") -> Dataset:
    """Write a 2-D uint16 MR slice with the usual identifying tags filled in."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.PatientID = patient_id
    for key, value in IDENTIFYING.items():
        setattr(ds, key, value)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_dicom_site(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str],
                     patients: list[str]) -> Path:
    """A DICOM site folder with ``manifest.csv`` (file,label,patient_id)."""
    rows = []
    for i, (img, label, patient) in enumerate(zip(images, labels, patients, strict=True)):
        rel = f"{patient}/img{i:05d}.dcm"
        write_mr(root / rel, img, patient_id=patient)
        rows.append({"file": rel, "label": classes[int(label)], "patient_id": patient})
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return root
