"""Class sub-folders of PNG/JPEG/TIFF/NIfTI/NRRD images: real files, bad files named."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medmeta_common.config import DataConfig, ImageConfig
from medmeta_common.data.images import read_image_file
from medmeta_common.data.sources import detect_format, load_site, read_raw
from medmeta_common.errors import DataError
from tests.conftest import shared_file


@pytest.fixture
def jpeg_site(tmp_path: Path) -> Path:
    """The 12 original brain-MRI JPEGs, one sub-folder per class."""
    samples = shared_file("brain_tumor_mri/samples")
    root = tmp_path / "site"
    shutil.copytree(samples, root)
    return root


def test_jpeg_class_folders(jpeg_site: Path) -> None:
    assert detect_format(jpeg_site) == "class-folders"
    site = read_raw(DataConfig(path=str(jpeg_site), split=None))
    assert site.classes == ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor")
    assert len(site.records) == 12 and not site.issues
    record = site.records[0]
    with Image.open(jpeg_site / record.ref) as img:
        expected = np.asarray(img.convert("RGB"), dtype=np.float32)  # the samples are RGB JPEGs
    np.testing.assert_array_equal(record.pixels, np.moveaxis(expected, -1, 0))
    assert record.modality == "jpg"


def test_mixed_sizes_and_channels_are_harmonised(jpeg_site: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, size=(50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(jpeg_site / "no_tumor" / "odd.png")
    raw = read_raw(DataConfig(path=str(jpeg_site), split=None))
    assert len({r.pixels.shape for r in raw.records}) > 1
    site = load_site(DataConfig(path=str(jpeg_site), split=None), ImageConfig(size=40, channels=1))
    assert site.images.shape == (13, 1, 40, 40)
    np.testing.assert_allclose(site.images.mean(axis=(1, 2, 3)), 0, atol=1e-4)


def test_sixteen_bit_png_keeps_its_range(tmp_path: Path) -> None:
    pixels = (np.arange(64 * 64).reshape(64, 64) * 13 % 65535).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(pixels).save(path)
    decoded = read_image_file(path)
    np.testing.assert_array_equal(decoded.frames[0, 0], pixels.astype(np.float32))


def test_nifti_volume_middle_and_all_slices(tmp_path: Path, brain_npz: Path) -> None:
    with np.load(brain_npz) as raw:
        volume = np.stack(raw["test_images"][:5], axis=-1).astype(np.float32)  # (64, 64, 5)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    middle = read_image_file(path, frames="middle")
    every = read_image_file(path, frames="all")
    assert middle.frames.shape == (1, 1, 64, 64) and every.frames.shape == (5, 1, 64, 64)
    np.testing.assert_array_equal(middle.frames[0, 0], volume[..., 2])
    np.testing.assert_array_equal(every.frames[:, 0], np.moveaxis(volume, -1, 0))


def test_nrrd_volume() -> None:
    path = shared_file("segmentation/brain_breast_mr/brain1_image.nrrd")
    decoded = read_image_file(path, frames="all")
    assert decoded.frames.shape == (25, 1, 256, 256)
    assert decoded.modality == "nrrd"


def test_bad_files_are_named_and_skipped_when_lenient(jpeg_site: Path) -> None:
    (jpeg_site / "no_tumor" / "notes.txt").write_text("scanner log")
    (jpeg_site / "glioma_tumor" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    os.symlink(jpeg_site / "missing.png", jpeg_site / "meningioma_tumor" / "dangling.png")
    (jpeg_site / "empty_class").mkdir()
    site = read_raw(DataConfig(path=str(jpeg_site), split=None, policy="lenient"))
    reasons = {i.file: i.reason for i in site.issues}
    assert set(reasons) == {"no_tumor/notes.txt", "glioma_tumor/broken.png",
                            "meningioma_tumor/dangling.png", "empty_class"}
    assert "not an image file" in reasons["no_tumor/notes.txt"]
    assert "file not found" in reasons["meningioma_tumor/dangling.png"]
    assert "has no image files" in reasons["empty_class"]
    assert len(site.records) == 12  # every good file still read


def test_strict_stops_at_first_bad_file(jpeg_site: Path) -> None:
    (jpeg_site / "glioma_tumor" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage" * 5)
    with pytest.raises(DataError) as info:
        read_raw(DataConfig(path=str(jpeg_site), split=None, policy="strict"))
    assert info.value.file == "glioma_tumor/broken.jpg"
    assert "strict" in info.value.reason


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a folder without permissions")
def test_unreadable_folder_is_reported(jpeg_site: Path) -> None:
    locked = jpeg_site / "no_tumor"
    locked.chmod(0)
    try:
        site = read_raw(DataConfig(path=str(jpeg_site), split=None))
        assert any("cannot read" in i.reason for i in site.issues)
    finally:
        locked.chmod(0o755)


def test_path_that_is_not_a_site(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"neither manifest\.csv nor class sub-folders"):
        detect_format(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        detect_format(tmp_path / "nowhere")
    with pytest.raises(DataError, match="a single file is not a site"):
        detect_format(tmp_path / "a.png")


def test_nothing_usable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.txt").write_text("no")
    with pytest.raises(DataError, match="no usable images"):
        load_site(DataConfig(path=str(tmp_path), split=None), ImageConfig())
