"""Tests of medmeta_common.data.dicom on pydicom's bundled DICOM files (no mocks)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from medmeta_common.data.dicom import DicomImage, is_dicom_file, read_dicom
from medmeta_common.errors import DataError


def data_file(name: str) -> Path:
    """Path of a DICOM file shipped in pydicom's wheel; skip the test if it is missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"{name} is not in this pydicom wheel")
    return Path(found)


def raw(name: str) -> tuple[pydicom.Dataset, np.ndarray]:
    """The dataset and pydicom's own decoded array, as a reference."""
    ds = pydicom.dcmread(data_file(name))
    return ds, ds.pixel_array


def write_variant(name: str, tmp_path: Path, **changes: object) -> Path:
    """Copy a test file with some attributes changed (``None`` deletes one)."""
    ds = pydicom.dcmread(data_file(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out = tmp_path / f"variant_{name}"
    ds.save_as(out)
    return out


def identifying_values(name: str) -> list[str]:
    """Identifying strings of a test file, to check that none leaks."""
    ds = pydicom.dcmread(data_file(name))
    keys = ("PatientName", "PatientID", "StudyDate", "SeriesDate", "SOPInstanceUID",
            "StudyInstanceUID", "SeriesInstanceUID", "InstitutionName", "AccessionNumber")
    values = [str(ds.get(k) or "") for k in keys]
    return [v for v in values if len(v) >= 4]


def assert_valid(image: DicomImage) -> None:
    assert isinstance(image, DicomImage)
    assert image.frames.dtype == np.float32 and image.frames.ndim == 4
    assert image.frames.shape[1] in (1, 3)
    assert np.isfinite(image.frames).all()


# --- pixel pipeline -------------------------------------------------------------------


def test_ct_small_rescaled_to_hounsfield_units() -> None:
    ds, arr = raw("CT_small.dcm")
    expected = apply_modality_lut(arr, ds).astype(np.float32)
    image = read_dicom(data_file("CT_small.dcm"))
    assert image.frames.shape == (1, 1, 128, 128)
    assert image.modality == "CT"
    assert image.photometric == "MONOCHROME2"
    assert image.bits_stored == 16 and image.number_of_frames == 1
    assert image.transfer_syntax == "Explicit VR Little Endian"
    assert float(ds.RescaleIntercept) != 0 and not np.array_equal(expected, arr)
    np.testing.assert_array_equal(image.frames[0, 0], expected)
    assert image.frames.min() < 0  # air is negative HU


def test_mr_small_16_bit_signed_with_window() -> None:
    ds, arr = raw("MR_small.dcm")
    assert arr.dtype == np.int16 and "WindowCenter" in ds
    expected = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32)
    image = read_dicom(data_file("MR_small.dcm"))
    assert image.frames.shape == (1, 1, 64, 64) and image.modality == "MR"
    np.testing.assert_array_equal(image.frames[0, 0], expected)


def test_8_bit_monochrome() -> None:
    ds, arr = raw("image_dfl.dcm")
    assert ds.BitsStored == 8 and arr.dtype == np.uint8
    image = read_dicom(data_file("image_dfl.dcm"))
    assert image.bits_stored == 8 and image.transfer_syntax == "Deflated Explicit VR Little Endian"
    np.testing.assert_array_equal(image.frames[0, 0], arr.astype(np.float32))


def test_signed_14_bit_jpeg2000_with_negative_raw_values() -> None:
    ds, arr = raw("693_J2KI.dcm")
    assert ds.PixelRepresentation == 1 and arr.min() < 0
    expected = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32)
    image = read_dicom(data_file("693_J2KI.dcm"))
    np.testing.assert_array_equal(image.frames[0, 0], expected)


def test_unsigned_16_bit() -> None:
    ds, arr = raw("JPEGLSNearLossless_16.dcm")
    assert ds.PixelRepresentation == 0 and arr.dtype == np.uint16 and arr.max() > 2**15
    image = read_dicom(data_file("JPEGLSNearLossless_16.dcm"))
    np.testing.assert_array_equal(image.frames[0, 0], arr.astype(np.float32))
    assert image.modality == "OT"  # no Modality in this file


@pytest.mark.parametrize(
    ("reference", "encoded"),
    [
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
        ("MR_small.dcm", "MR_small_implicit.dcm"),
        ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG lossless P14 SV1
        ("SC_rgb_rle.dcm", "SC_rgb_gdcm_KY.dcm"),  # JPEG 2000
        ("rtdose.dcm", "rtdose_rle.dcm"),  # 32-bit, 15 frames
    ],
)
def test_lossless_encodings_match_reference(reference: str, encoded: str) -> None:
    for policy in ("middle", "all"):
        ref = read_dicom(data_file(reference), multiframe=policy)
        enc = read_dicom(data_file(encoded), multiframe=policy)
        assert enc.transfer_syntax != ref.transfer_syntax or reference == encoded
        np.testing.assert_array_equal(enc.frames, ref.frames)


@pytest.mark.parametrize(
    ("reference", "encoded", "max_mean_error"),
    [
        ("SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", 2.0),  # JPEG baseline, YBR_FULL
        ("SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm", 2.0),  # YBR -> RGB
        ("SC_rgb_rle.dcm", "SC_rgb_jls_lossy_line.dcm", 2.0),  # JPEG-LS near-lossless
        ("SC_rgb_jpeg_dcmd.dcm", "SC_rgb_jpeg.dcm", 1.0),
    ],
)
def test_lossy_and_ybr_encodings_close_to_reference(
    reference: str, encoded: str, max_mean_error: float
) -> None:
    ref = read_dicom(data_file(reference)).frames
    enc = read_dicom(data_file(encoded)).frames
    assert enc.shape == ref.shape and enc.shape[1] == 3
    assert float(np.abs(enc - ref).mean()) < max_mean_error
    # colour channels are in RGB order: the channel means agree
    np.testing.assert_allclose(enc.mean(axis=(2, 3)), ref.mean(axis=(2, 3)), atol=3.0)


def test_palette_colour_expanded_to_rgb() -> None:
    image = read_dicom(data_file("examples_palette.dcm"))
    assert image.photometric == "PALETTE COLOR" and image.frames.shape == (1, 3, 350, 800)
    assert not np.array_equal(image.frames[0, 0], image.frames[0, 2])


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    mono2 = read_dicom(data_file("MR_small.dcm")).frames
    mono1 = read_dicom(write_variant("MR_small.dcm", tmp_path,
                                     PhotometricInterpretation="MONOCHROME1")).frames
    # windowed output range of signed 16-bit data is [-32768, 32767]: flipped within it
    np.testing.assert_array_equal(mono1 + mono2, np.full_like(mono1, -1.0))
    assert mono1.flat[np.argmax(mono1)] == -1.0 - mono2.min()
    assert mono2.flat[np.argmax(mono1)] == mono2.min()  # darkest became brightest
    assert mono2.flat[np.argmin(mono1)] == mono2.max()


def test_monochrome1_without_window_keeps_order_reversed(tmp_path: Path) -> None:
    mono2 = read_dicom(data_file("CT_small.dcm")).frames
    mono1 = read_dicom(write_variant("CT_small.dcm", tmp_path,
                                     PhotometricInterpretation="MONOCHROME1")).frames
    total = mono1 + mono2
    assert np.all(total == total.flat[0])  # x -> c - x
    assert np.argmax(mono1) == np.argmin(mono2) and np.argmin(mono1) == np.argmax(mono2)


def test_window_clips_to_voi_range(tmp_path: Path) -> None:
    path = write_variant("CT_small.dcm", tmp_path, WindowCenter=40, WindowWidth=400)
    ds, arr = raw("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    expected = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32)
    out = read_dicom(path).frames[0, 0]
    np.testing.assert_array_equal(out, expected)
    hu = apply_modality_lut(arr, ds)
    # pydicom maps values below/above the window to the ends of the nominal output range
    y_min, y_max = -32768 + float(ds.RescaleIntercept), 32767 + float(ds.RescaleIntercept)
    assert (hu <= 40 - 0.5 - 199.5).any() and (hu > 40 - 0.5 + 199.5).any()
    assert np.all(out[hu <= 40 - 0.5 - 199.5] == y_min)
    assert np.all(out[hu > 40 - 0.5 + 199.5] == y_max)
    assert out.min() >= y_min and out.max() <= y_max


def test_first_of_several_windows_is_used(tmp_path: Path) -> None:
    path = write_variant("CT_small.dcm", tmp_path, WindowCenter=[40, 400],
                         WindowWidth=[400, 2000])
    ds, arr = raw("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 400
    expected = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32)
    np.testing.assert_array_equal(read_dicom(path).frames[0, 0], expected)


def test_multiframe_colour_policies() -> None:
    path = data_file("examples_ybr_color.dcm")
    middle = read_dicom(path)
    every = read_dicom(path, multiframe="all")
    count = every.number_of_frames
    assert count == middle.number_of_frames == 30
    assert middle.frames.shape == (1, 3, 240, 320)
    assert every.frames.shape == (count, 3, 240, 320)
    np.testing.assert_array_equal(middle.frames[0], every.frames[count // 2])
    assert not np.array_equal(every.frames[0], every.frames[count // 2])
    assert middle.photometric == "YBR_FULL_422" and middle.modality == "US"


def test_multiframe_monochrome_all_matches_pydicom() -> None:
    ds, arr = raw("rtdose.dcm")
    expected = apply_modality_lut(arr, ds).astype(np.float32)
    every = read_dicom(data_file("rtdose.dcm"), multiframe="all")
    assert every.frames.shape == (15, 1, 10, 10)
    np.testing.assert_array_equal(every.frames[:, 0], expected)


def test_file_without_preamble_is_read_when_it_is_an_image(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data_file("MR_small.dcm"))
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    path = tmp_path / "headless"
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert not is_dicom_file(path)
    image = read_dicom(path)
    assert image.transfer_syntax == "Implicit VR Little Endian"
    np.testing.assert_array_equal(image.frames, read_dicom(data_file("MR_small.dcm")).frames)


def test_invalid_policy_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="multiframe"):
        read_dicom(data_file("CT_small.dcm"), multiframe="first")  # type: ignore[arg-type]


# --- errors and privacy ---------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    ct = data_file("CT_small.dcm").read_bytes()
    files: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, reason: str) -> None:
        path = tmp_path / name
        path.write_bytes(data)
        files[name] = (path, reason)

    put("notes.txt", b"Patient notes, not an image\n" * 20, "not a DICOM file")
    put("empty.dcm", b"", "empty file")
    put("ct_1000.dcm", ct[:1000], "truncated")
    put("ct_half.dcm", ct[: len(ct) // 2], "truncated")
    put("header_only.dcm", ct[:140], "truncated")
    png = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(png)
    files["photo.png"] = (png, "not a DICOM file")
    files["DICOMDIR"] = (data_file("DICOMDIR"), "no pixel data")
    files["test-SR.dcm"] = (data_file("test-SR.dcm"), "no pixel data")
    files["MR_truncated.dcm"] = (data_file("MR_truncated.dcm"), "truncated")
    return files


@pytest.mark.parametrize(
    "name",
    ["notes.txt", "empty.dcm", "ct_1000.dcm", "ct_half.dcm", "header_only.dcm", "photo.png",
     "DICOMDIR", "test-SR.dcm", "MR_truncated.dcm"],
)
def test_bad_files_raise_data_error(tmp_path: Path, name: str) -> None:
    path, reason = _bad_files(tmp_path)[name]
    shown = f"site-a/{name}"
    with pytest.raises(DataError) as info:
        read_dicom(path, display_name=shown)
    err = info.value
    assert err.file == shown
    assert reason in err.reason
    assert str(err) == f"{shown}: {err.reason}"
    assert str(path) not in str(err) and "Traceback" not in str(err)
    assert len(err.reason) < 200
    for value in identifying_values("CT_small.dcm"):
        assert value not in str(err)


def test_display_name_defaults_to_path(tmp_path: Path) -> None:
    path = tmp_path / "nothing.dcm"
    path.write_bytes(b"x" * 300)
    with pytest.raises(DataError) as info:
        read_dicom(path)
    assert info.value.file == str(path)


def test_undecodable_compressed_file_is_a_data_error() -> None:
    # 12-bit lossy JPEG that libjpeg rejects and Pillow cannot decode
    with pytest.raises(DataError, match="JPEG Extended") as info:
        read_dicom(data_file("JPEG-lossy.dcm"), display_name="x.dcm")
    assert "decoders" in info.value.reason


def test_unknown_transfer_syntax_reason(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    path = tmp_path / "odd.dcm"
    ds.save_as(path)
    with pytest.raises(DataError, match="unknown transfer syntax") as info:
        read_dicom(path)
    assert "1.2.3.4.5.6.7" not in str(info.value)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"Rows": 0}, "zero rows or columns"),
        ({"PhotometricInterpretation": "CMYK"}, "unsupported photometric"),
        ({"SamplesPerPixel": 3}, "samples per pixel"),
        ({"BitsAllocated": None}, "missing image attribute(s): BitsAllocated"),
        ({"RescaleSlope": 1e300}, "not finite"),
    ],
)
def test_inconsistent_attributes(tmp_path: Path, changes: dict, reason: str) -> None:
    path = write_variant("CT_small.dcm", tmp_path, **changes)
    with pytest.raises(DataError) as info:
        read_dicom(path)
    assert reason in info.value.reason


def test_no_identifying_values_in_image_or_repr() -> None:
    image = read_dicom(data_file("CT_small.dcm"))
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    assert image.patient_id == ds.PatientID  # kept for grouping only
    shown = repr(image) + image.modality + image.photometric + image.transfer_syntax
    for value in identifying_values("CT_small.dcm"):
        assert value not in shown


def test_no_warning_or_pydicom_log_escapes(caplog: pytest.LogCaptureFixture) -> None:
    before = logging.getLogger("pydicom").level
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any escaping warning fails the test
        read_dicom(data_file("MR_small_padded.dcm"))  # pydicom warns about the padding
        with pytest.raises(DataError):
            read_dicom(data_file("JPEG-lossy.dcm"))  # pydicom logs decoder tracebacks
    assert logging.getLogger("pydicom").level == before
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]
    ours = [r for r in caplog.records if r.name == "medmeta_common.data.dicom"]
    assert ours and all(r.levelno == logging.DEBUG for r in ours)


def test_is_dicom_file(tmp_path: Path) -> None:
    assert is_dicom_file(data_file("CT_small.dcm"))
    assert is_dicom_file(data_file("JPEG2000.dcm"))
    assert not is_dicom_file(data_file("no_meta.dcm"))  # valid data set, no preamble
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "short").write_bytes(b"\0" * 128 + b"DIC")
    (tmp_path / "text").write_text("hello" * 50)
    for name in ("empty", "short", "text", "missing"):
        assert not is_dicom_file(tmp_path / name)
    assert not is_dicom_file(tmp_path)  # a folder


# Read in a child process with a memory cap and a time limit, so that a regression
# (a decoder allocating without bound, or looping forever) fails instead of killing pytest.
_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from medmeta_common.data.dicom import read_dicom
from medmeta_common.errors import DataError
try:
    read_dicom(sys.argv[1])
except DataError as err:
    print("DataError:", err.reason)
"""


def _read_in_child(path: Path) -> str:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True,
                          text=True, timeout=60, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_jpeg_ls_frame_of_height_zero_is_rejected_before_decoding(tmp_path: Path) -> None:
    # found by fuzzing: libjpeg allocates without bound on a JPEG-LS SOF height of 0
    data = data_file("MR_small_jpeg_ls_lossless.dcm").read_bytes()
    sof = b"\xff\xf7\x00\x0b\x10\x00\x40\x00\x40"  # SOF55, 16 bits, 64 x 64
    assert data.count(sof) == 1
    path = tmp_path / "height0.dcm"
    path.write_bytes(data.replace(sof, sof[:5] + b"\x00\x00" + sof[7:]))
    assert "size does not match Rows/Columns" in _read_in_child(path)


def test_jp2_without_codestream_box_does_not_hang(tmp_path: Path) -> None:
    # found by fuzzing: pydicom's JP2 box walk loops forever when 'jp2c' is damaged
    data = data_file("GDCMJ2K_TextGBR.dcm").read_bytes()
    assert data.count(b"jp2c") == 1
    path = tmp_path / "nojp2c.dcm"
    path.write_bytes(data.replace(b"jp2c", b"jn2c"))
    assert "DataError: corrupt pixel data" in _read_in_child(path)


# --- fuzz -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"])
def test_fuzzed_files_give_image_or_data_error(tmp_path: Path, name: str) -> None:
    source = data_file(name).read_bytes()
    secrets = identifying_values(name)
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzzed.dcm"
    outcomes = {"image": 0, "error": 0}

    def check(data: bytes, policy: str) -> None:
        path.write_bytes(data)
        try:
            image = read_dicom(path, multiframe=policy, display_name="fuzzed.dcm")
        except DataError as err:  # any other exception type fails the test
            assert err.file == "fuzzed.dcm" and err.reason
            assert not any(value in str(err) for value in secrets)
            outcomes["error"] += 1
        else:
            assert_valid(image)
            outcomes["image"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(300):
            data = bytearray(source)
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 21))):
                data[pos] ^= 1 << int(rng.integers(0, 8))
            check(bytes(data), "all" if i % 2 else "middle")
        for length in rng.integers(0, len(source), size=50):
            check(source[:length], "middle")
    assert outcomes["image"] > 0 and outcomes["error"] > 0
