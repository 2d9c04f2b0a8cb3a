"""Decode one image file of any supported format into channel-first float32 frames.

Formats
-------
- DICOM (``.dcm``, ``.dicom``, or any file with the DICM preamble): see :mod:`.dicom`.
- PNG, JPEG, BMP: Pillow. TIFF: tifffile (keeps 16-bit depth).
- NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``, ``.nhdr``): MONAI ``LoadImage``.

Volume and multi-frame policy
-----------------------------
A 3-D volume is a stack of 2-D slices along its last axis (axial for the usual
RAS/LPS orientation). ``middle`` keeps the middle slice (one record per file);
``all`` keeps every slice, each a record of the same patient. DICOM multi-frame
files follow the same policy. Anything with more than three spatial/channel axes is
refused with a clear reason.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medmeta_common.errors import DataError

log = logging.getLogger(__name__)

FramePolicy = Literal["middle", "all"]

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES + VOLUME_SUFFIXES + DICOM_SUFFIXES


@dataclass(frozen=True)
class DecodedFile:
    """Frames decoded from one file.

    Attributes
    ----------
    frames : np.ndarray
        ``(F, C, H, W)`` float32; ``F`` follows the frame policy.
    modality : str
        DICOM modality code, or the file kind (``png``, ``nifti``...).
    patient_id : str | None
        DICOM PatientID, for grouping only; ``None`` for other formats.

    """

    frames: np.ndarray
    modality: str
    patient_id: str | None = None


def suffix_of(path: Path) -> str:
    """Lower-case suffix, treating ``.nii.gz`` as one suffix."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def looks_like_image(path: Path) -> bool:
    """True for files medmeta would try to decode (by suffix, or a DICOM preamble)."""
    if suffix_of(path) in IMAGE_SUFFIXES:
        return True
    if not (path.suffix == "" and path.is_file()):
        return False
    from medmeta_common.data.dicom import is_dicom_file  # pydicom: ~0.2 s, load on use

    return is_dicom_file(path)


def input_files(path: Path) -> list[Path]:
    """``path`` itself, or every image file below a folder (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                      and looks_like_image(p))
    raise DataError(str(path), "no such file or folder")


def read_image_file(
    path: Path, *, frames: FramePolicy = "middle", display_name: str | None = None
) -> DecodedFile:
    """Decode ``path`` into frames; raise :class:`DataError` naming it on any failure."""
    name = display_name or str(path)
    suffix = suffix_of(path)
    if not path.is_file():
        raise DataError(name, "file not found" if not path.exists() else "not a regular file")
    from medmeta_common.data.dicom import is_dicom_file, read_dicom

    if suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and is_dicom_file(path)):
        image = read_dicom(path, multiframe=frames, display_name=name)
        return DecodedFile(image.frames, image.modality, image.patient_id)
    if suffix in PIL_SUFFIXES:
        kind = suffix.lstrip(".").replace("jpeg", "jpg")
        return DecodedFile(_pick(_read_pil(path, name), frames), kind)
    if suffix in TIFF_SUFFIXES:
        return DecodedFile(_pick(_read_tiff(path, name), frames), "tiff")
    if suffix in VOLUME_SUFFIXES:
        kind = "nifti" if suffix.startswith(".nii") else "nrrd"
        reader = "NibabelReader" if kind == "nifti" else "NrrdReader"
        return DecodedFile(_pick(_read_volume(path, name, reader), frames), kind)
    raise DataError(name, f"unsupported file type {suffix or '(no suffix)'}; expected DICOM, "
                    "PNG, JPEG, BMP, TIFF, NIfTI or NRRD")


def _pick(stack: np.ndarray, policy: FramePolicy) -> np.ndarray:
    """Apply the frame policy to an ``(F, C, H, W)`` stack."""
    if policy == "middle" and stack.shape[0] > 1:
        mid = stack.shape[0] // 2
        stack = stack[mid : mid + 1]
    return np.ascontiguousarray(stack, dtype=np.float32)


def _check_finite(stack: np.ndarray, name: str) -> np.ndarray:
    if stack.size == 0 or min(stack.shape[-2:]) < 1:
        raise DataError(name, f"image has no pixels (shape {tuple(stack.shape)})")
    if not np.isfinite(stack).all():
        raise DataError(name, "image contains NaN or infinite values")
    return stack


def _read_pil(path: Path, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as opened:
                opened.load()
                img: Image.Image = opened
                if img.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                    img = img.convert("RGB")
                elif img.mode == "LA" or img.mode == "1":
                    img = img.convert("L")
                array = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(name, f"not a readable image ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one clear error of ours
        raise DataError(name, f"corrupt image ({type(exc).__name__})") from None
    return _check_finite(_channel_first(array, name)[None], name)


def _read_tiff(path: Path, name: str) -> np.ndarray:
    import tifffile

    try:
        array = np.asarray(tifffile.imread(path))
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on corrupt input
        raise DataError(name, f"not a readable TIFF ({type(exc).__name__}: {exc})") from None
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        return _check_finite(_channel_first(array, name)[None], name)
    if array.ndim == 3:  # a page stack: (F, H, W)
        return _check_finite(array[:, None].astype(np.float32), name)
    raise DataError(name, f"TIFF with {array.ndim} axes is not supported (shape {array.shape})")


def _read_volume(path: Path, name: str, reader: str) -> np.ndarray:
    from monai.transforms import LoadImage

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = np.asarray(LoadImage(reader, image_only=True, dtype=np.float32)(str(path)))
    except Exception as exc:  # noqa: BLE001 - nibabel/pynrrd raise many types on corrupt input
        raise DataError(name, f"not a readable volume ({type(exc).__name__})") from None
    if array.ndim == 2:
        return _check_finite(array[None, None], name)
    if array.ndim == 3:  # (X, Y, Z) -> Z slices of (1, X, Y)
        return _check_finite(np.moveaxis(array, -1, 0)[:, None], name)
    raise DataError(name, f"volume with {array.ndim} axes is not supported (shape {array.shape}); "
                    "give 2-D images or 3-D volumes")


def _channel_first(array: np.ndarray, name: str) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` to ``(C, H, W)`` float32, dropping an alpha channel."""
    if array.ndim == 2:
        return array[None].astype(np.float32)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return np.moveaxis(array[..., :3], -1, 0).astype(np.float32)
    raise DataError(name, f"unexpected image shape {array.shape}")
