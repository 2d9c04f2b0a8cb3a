"""Read one DICOM file into float32 pixels a model can use.

Pipeline (monochrome): decode (pydicom 3 with the pylibjpeg and pillow plugins) ->
Modality LUT or Rescale Slope/Intercept -> VOI LUT or the first Window Center/Width, when
present -> MONOCHROME1 inverted so that high values are bright, like MONOCHROME2.
Colour: YBR is converted to RGB and PALETTE COLOR expanded to RGB by its palette; no
rescale or windowing (they are defined for monochrome only).

Multi-frame policy: ``multiframe="middle"`` (the default) decodes only the middle frame,
index ``number_of_frames // 2``, so one file gives one record; ``multiframe="all"`` keeps
every frame in file order.

Every failure is a :class:`~medmeta_common.errors.DataError` naming the file and a short
reason. Neither reasons, log lines nor :class:`DicomImage` carry identifying DICOM values
(names, dates, UIDs, institution...), except the ``patient_id`` attribute, which callers
use only to group records and which is left out of ``repr``.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from medmeta_common.data.dicom_frames import check_codestreams
from medmeta_common.errors import DataError

__all__ = ["DicomImage", "is_dicom_file", "read_dicom"]

_log = logging.getLogger(__name__)

_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_REQUIRED = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
             "SamplesPerPixel", "PhotometricInterpretation")
# First two bytes of a DICOM data set without preamble: group 0000, 0002 or 0008, LE or BE.
_HEADLESS_STARTS = (b"\x00\x00", b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
_CODE = re.compile(r"[A-Z0-9_ ]{1,16}")


@dataclass(frozen=True)
class DicomImage:
    """Decoded pixels of one DICOM file and its non-identifying description.

    Attributes
    ----------
    frames : np.ndarray
        ``(F, C, H, W)`` float32; ``C`` is 1 for MONOCHROME1/2 and 3 for colour (RGB).
    modality : str
        (0008,0060) code such as ``"MR"``; ``"OT"`` when absent or malformed.
    patient_id : str | None
        (0010,0020), for grouping records per patient only; never log or print it.
    photometric : str
        Photometric Interpretation as stored in the file (colour output is always RGB).
    bits_stored : int
        (0028,0101) Bits Stored.
    transfer_syntax : str
        Transfer syntax name, e.g. ``"JPEG 2000 Image Compression"``.
    number_of_frames : int
        Frames in the file, before the multi-frame policy picks some.

    """

    frames: np.ndarray
    modality: str
    patient_id: str | None = field(repr=False)
    photometric: str
    bits_stored: int
    transfer_syntax: str
    number_of_frames: int


def is_dicom_file(path: Path) -> bool:
    """Return True if ``path`` has the ``DICM`` magic at byte 128 (reads 132 bytes).

    Parameters
    ----------
    path : Path
        File to check; unreadable files are not DICOM.

    Returns
    -------
    bool

    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_dicom(
    path: Path,
    *,
    multiframe: Literal["middle", "all"] = "middle",
    display_name: str | None = None,
) -> DicomImage:
    """Read a DICOM file and return its pixels after rescale, windowing and inversion.

    Parameters
    ----------
    path : Path
        The DICOM file.
    multiframe : {"middle", "all"}
        Keep the middle frame only (``F = 1``) or every frame (see the module docstring).
    display_name : str, optional
        Name used in error messages; defaults to ``str(path)``.

    Returns
    -------
    DicomImage

    Raises
    ------
    DataError
        The file is not DICOM, is corrupt, has no pixel data or cannot be decoded.
    ValueError
        ``multiframe`` is not one of the two policies (a programming error).

    """
    if multiframe not in ("middle", "all"):
        raise ValueError(f"multiframe must be 'middle' or 'all', not {multiframe!r}")
    name = str(path) if display_name is None else display_name
    with _quiet_pydicom(name):
        ds = _read_dataset(Path(path), name)
        with _failing(name, "reading image attributes"):
            return _to_image(ds, multiframe, name, Path(path).stat().st_size)


_quiet_lock = threading.Lock()
_quiet_state = {"depth": 0, "level": logging.NOTSET}


@contextmanager
def _quiet_pydicom(name: str) -> Iterator[None]:
    """Silence pydicom's warnings and log records (they may echo tag values).

    pydicom logs decoder failures with tracebacks on child loggers, so the ``pydicom``
    logger's level is raised while any read is in progress (thread-safe, nested).
    """
    pydicom_log = logging.getLogger("pydicom")
    with _quiet_lock:
        if _quiet_state["depth"] == 0:
            _quiet_state["level"] = pydicom_log.level
            pydicom_log.setLevel(logging.CRITICAL + 1)
        _quiet_state["depth"] += 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        with _quiet_lock:
            _quiet_state["depth"] -= 1
            if _quiet_state["depth"] == 0:
                pydicom_log.setLevel(_quiet_state["level"])
        if caught:
            _log.debug("%s: silenced %d pydicom warning(s)", name, len(caught))


@contextmanager
def _failing(name: str, what: str, reason: str = "") -> Iterator[None]:
    """Turn any exception other than DataError into a DataError about ``what``.

    The reason names the exception type, never its message (which may echo tag values).
    """
    try:
        yield
    except DataError:
        raise
    except MemoryError:
        raise DataError(name, f"too large to fit in memory while {what}") from None
    except BaseException as exc:  # file boundary: pydicom raises anything on bad data
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise  # KeyboardInterrupt, SystemExit...; a Rust decoder's panic is data
        _log.debug("%s: %s while %s", name, type(exc).__name__, what)
        detail = f"{type(exc).__name__} while {what}"
        raise DataError(name, f"{reason} ({detail})" if reason else
                        f"truncated or corrupt DICOM ({detail})") from None


def _read_dataset(path: Path, name: str) -> Dataset:
    """Parse the file; retry files without preamble only if they look like images."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise DataError(name, f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    if not head:
        raise DataError(name, "empty file")
    with _failing(name, "reading the header"):
        try:
            return pydicom.dcmread(path)
        except InvalidDicomError:  # no 'DICM' preamble: see whether it is a headless image
            pass
    if head[:2] not in _HEADLESS_STARTS:
        raise DataError(name, "not a DICOM file")
    try:
        ds = pydicom.dcmread(path, force=True)
        ok = "PixelData" in ds and "Rows" in ds and "Columns" in ds
    except Exception:  # noqa: BLE001 - random bytes parsed as DICOM: anything can happen
        ok = False
    if not ok:
        raise DataError(name, "not a DICOM file")
    return ds


def _to_image(ds: Dataset, multiframe: str, name: str, size: int) -> DicomImage:
    """Validate the image attributes, decode, and apply the display pipeline."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise DataError(name, "float pixel data (e.g. a parametric map) is not supported")
        if _cut_short(ds, size):
            raise DataError(name, "truncated DICOM: the file ends early")
        if _is_image_class(ds):
            raise DataError(name, "no pixel data in an image object (truncated or incomplete file)")
        raise DataError(
            name, "no pixel data (e.g. a DICOMDIR, structured report or truncated file)"
        )
    syntax = _transfer_syntax(ds, name)
    missing = [k for k in _REQUIRED if ds.get(k) in (None, "")]
    if missing:
        raise DataError(name, f"missing image attribute(s): {', '.join(missing)}")
    rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel)
    if rows <= 0 or cols <= 0:
        raise DataError(name, "image has zero rows or columns")
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric not in _MONO + _COLOUR:
        raise DataError(name, "unsupported photometric interpretation")
    if spp != (1 if photometric in _MONO or photometric == "PALETTE COLOR" else 3):
        raise DataError(name, "samples per pixel does not match the photometric interpretation")
    n_frames = int(get_nr_frames(ds, warn=False))
    if n_frames <= 0:
        raise DataError(name, "invalid number of frames")

    frame_shape = (rows, cols) if spp == 1 else (rows, cols, spp)
    failed = ("corrupt pixel data, or a variant the installed decoders do not support"
              if syntax.is_compressed else "")
    with _failing(name, f"decoding {syntax.name} pixel data", failed):
        # pydicom's own RLE decoder: pylibjpeg-rle panics (in Rust) on corrupt segments
        plugin = "pydicom" if syntax == RLELossless else ""
        index = n_frames // 2 if multiframe == "middle" else None
        if syntax.is_encapsulated and syntax != RLELossless:
            check_codestreams(ds, index, n_frames, (rows, cols), name)
        arr = pixel_array(ds, index=index, decoding_plugin=plugin)
        if index is not None or n_frames == 1:
            arr = arr[None]
    expected = (1 if multiframe == "middle" else n_frames, *frame_shape)
    if arr.shape != expected:
        raise DataError(name, f"pixel data has unexpected shape {arr.shape}, expected {expected}")
    with _failing(name, "applying rescale/windowing"):
        out = _display(arr, ds, photometric)
    if not np.isfinite(out).all():
        raise DataError(name, "pixel values are not finite after rescale/windowing")
    patient = str(ds.get("PatientID") or "").strip() or None
    modality = str(ds.get("Modality") or "").strip().upper()
    return DicomImage(
        frames=out,
        modality=modality if _CODE.fullmatch(modality) else "OT",
        patient_id=patient,
        photometric=photometric,
        bits_stored=int(ds.BitsStored),
        transfer_syntax=syntax.name,
        number_of_frames=n_frames,
    )


def _cut_short(ds: Dataset, size: int) -> bool:
    """Tell whether parsing stopped at a premature end of file (pydicom stops silently)."""
    list(ds.iterall())  # a sequence cut short raises here
    tags = list(ds.keys())
    if not tags:
        return True  # nothing after the file meta information
    last = ds.get_item(tags[-1])
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
        return False
    if last.value is not None and len(last.value) < last.length:
        return True  # value cut short
    meta = getattr(ds, "file_meta", None) or {}
    deflated = meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    return not deflated and 0 < size - (last.value_tell + last.length) < 8  # header cut


def _is_image_class(ds: Dataset) -> bool:
    """Tell whether the SOP class (from the file meta or the data set) is an image storage."""
    meta = getattr(ds, "file_meta", None) or {}
    uid = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    kind = UID(str(uid)).name if uid is not None else ""
    return "Image Storage" in kind or kind == "RT Dose Storage"


def _transfer_syntax(ds: Dataset, name: str) -> UID:
    """Return the transfer syntax (inferred for native files without one), decoder checked."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        if ds["PixelData"].is_undefined_length:
            raise DataError(name, "compressed pixel data but no transfer syntax in the file")
        implicit, little = ds.original_encoding
        syntax = (ImplicitVRLittleEndian if implicit else
                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = syntax
    if syntax not in AllTransferSyntaxes:
        raise DataError(name, "unknown transfer syntax")
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise DataError(name, f"compressed with {syntax.name}, for which no decoder is installed")
    return syntax


def _display(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """``(F, H, W[, 3])`` decoded values -> ``(F, C, H, W)`` float32 display values."""
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 4:
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32)
    out = _mono_lut(arr, ds)
    if photometric == "MONOCHROME1":
        # Flip within the output range the nominal raw range maps to, so that images
        # from one device stay comparable (MONOCHROME1: low values are displayed bright).
        bits = int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1])
        ends = _mono_lut(ends.astype(arr.dtype if arr.dtype.kind in "iu" else np.int64), ds)
        lo = min(float(ends.min()), float(out.min()))
        hi = max(float(ends.max()), float(out.max()))
        out = (lo + hi) - out
    return np.ascontiguousarray(out[:, None], dtype=np.float32)


def _mono_lut(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT or rescale, then VOI LUT or the first window, as float64."""
    out = apply_voi_lut(apply_modality_lut(arr, ds), ds, index=0)
    return np.asarray(out, dtype=np.float64)
