"""Compressed DICOM frames checked before any C decoder sees them.

A corrupt size field in a JPEG, JPEG-LS or JPEG 2000 frame (a height of 0, say) can
make a decoder allocate without bound and abort the whole process; so the coded
size of every frame is read from its header here and compared with Rows x Columns.
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame

from medmeta_common.errors import DataError

# JPEG start-of-frame markers (SOF0-SOF15 less DHT, JPG, DAC) and JPEG-LS SOF55
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def check_codestreams(
    ds: Dataset, index: int | None, n_frames: int, size: tuple[int, int], name: str
) -> None:
    """Reject JPEG / JPEG-LS / JPEG 2000 frames whose coded size is not Rows x Columns.

    A corrupt size field (e.g. a JPEG height of 0) can make a C decoder allocate
    without bound and abort the process, so it is checked before decoding.
    """
    frames = (
        [get_frame(ds.PixelData, index, number_of_frames=n_frames)] if index is not None
        else generate_frames(ds.PixelData, number_of_frames=n_frames)
    )
    for frame in frames:
        coded = _coded_size(frame)
        if coded is not None and coded != size:
            raise DataError(name, "corrupt compressed frame: its size does not match Rows/Columns")


def _coded_size(frame: bytes) -> tuple[int, int] | None:
    """Return (rows, columns) from a JPEG, JPEG-LS or JPEG 2000 header; None if not found."""
    if frame[:8] == b"\x00\x00\x00\x0cjP  ":  # JP2 file format: find the codestream box
        frame = _jp2_codestream(frame)
    if frame[:4] == b"\xff\x4f\xff\x51":  # J2K codestream: SOC then SIZ
        width, height, x0, y0 = struct.unpack(">4I", frame[8:24])
        return height - y0, width - x0
    pos = 2 if frame[:2] == b"\xff\xd8" else len(frame)  # JPEG: after SOI
    while pos + 9 <= len(frame) and frame[pos] == 0xFF:
        marker = frame[pos + 1]
        if marker in _SOF:
            height, width = struct.unpack(">2H", frame[pos + 5 : pos + 9])
            return height, width
        pos += 1 if marker == 0xFF else 2 + int.from_bytes(frame[pos + 2 : pos + 4], "big")
    return None


def _jp2_codestream(frame: bytes) -> bytes:
    """Return the 'jp2c' box of a JP2 file; raise ValueError if the boxes are broken.

    pydicom walks these boxes too and loops forever on some broken lengths.
    """
    pos = 0
    while pos + 8 <= len(frame):
        length = int.from_bytes(frame[pos : pos + 4], "big")
        kind = frame[pos + 4 : pos + 8]
        if kind == b"jp2c" and length != 1:
            return frame[pos + 8 : pos + length if length else len(frame)]
        if length < 8:  # 0 (to end of file) or 1 (64-bit length) before the codestream
            break
        pos += length
    raise ValueError("JP2 wrapper without a valid codestream box")
