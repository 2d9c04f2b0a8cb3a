"""Detection sites: images with bounding boxes, from Pascal VOC, COCO JSON or a CSV of boxes.

Layouts recognised at ``data.path`` (see docs/data.md, "Detection sites"):

- **Pascal VOC**: a folder with ``Annotations/*.xml`` and ``JPEGImages/``; the split
  comes from ``ImageSets/Main/<split>.txt`` when that list exists.
- **COCO JSON**: a ``.json`` file, or a folder holding one (``annotations.json`` when
  there are several); image files relative to the JSON's folder or its ``images/``.
- **CSV of boxes**: a folder with ``boxes.csv`` (or ``data.manifest`` when it is a
  ``.csv``) with the columns ``file,x_min,y_min,x_max,y_max,label`` and optionally
  ``patient_id`` (the only layout that names patients) and ``split``; one row per box,
  a row with empty coordinates and label lists an image without boxes.

Box policy: every box must have numeric coordinates inside its image
(``[0, width] x [0, height]``), a positive size and a known label (COCO: a category
the file declares; a label outside ``data.classes`` is not an error, the box is
dropped). **An image with any bad box is reported (the file and the CSV line, VOC
``<object>`` number or COCO annotation id) and skipped whole, never half-used**:
``lenient`` (the default, used by CI and the benchmark) skips it with a warning,
``strict`` stops at the first one. Real BCCD has two such images (zero-size boxes in
``BloodImage_00338`` and ``BloodImage_00343``).

Tiling: an image whose longest side exceeds 1.5 x ``tile`` is cut into ``tile`` x
``tile`` windows that cover it exactly with overlap (per axis ``ceil(L / tile)``
windows, evenly spaced from 0 to ``L - tile``; an axis no longer than ``tile`` is one
full-length window). A box goes to a tile, clipped, when the tile holds at least half
of its area. Every tile is kept, also those without boxes; all tiles of an image share
its source and group, so splits never cut an image and its privacy record is the
whole image.

Coordinates: boxes are ``x_min, y_min, x_max, y_max`` as the source gives them
(continuous pixel coordinates, VOC's 1-based values used as they are). Each row is
harmonised like a classification image (longest side to ``size``, centred on a square);
its ``origin`` ``(x0, y0, sx, sy, pad_x, pad_y)`` maps row pixels back to the source
image exactly: ``source_x = (row_x - pad_x) / sx + x0`` (same for y), where ``(x0, y0)``
is the window's corner in the source, ``sx = rw / w`` and ``sy = rh / h`` the resize
factors (``rw, rh`` the resized width and height, rounded as MONAI ``Resize`` does) and
``pad_x = (size - rw) // 2``, ``pad_y = (size - rh) // 2`` the centring pad.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from medmeta_common.config import ImageConfig
from medmeta_common.data.box_annotations import Annotations, Entry, number_text
from medmeta_common.data.images import read_image_file
from medmeta_common.data.issues import IssueLog
from medmeta_common.data.records import LoadIssue, issues_array, issues_of
from medmeta_common.data.transforms import harmonise_stack
from medmeta_common.errors import DataError

KEEP_FRACTION = 0.5  # share of a box's area a tile must hold to keep it
_BATCH = 256  # rows harmonised per call (bounds memory for large sites)


@dataclass(frozen=True)
class DetectionData:
    """Harmonised rows (whole images or tiles) ``(N, C, S, S)`` with their boxes.

    ``boxes`` ``(M, 4)`` float32 are ``x_min, y_min, x_max, y_max`` in the harmonised
    pixels of row ``box_rows[m]`` (sorted ascending), labelled ``box_labels[m]`` (an
    index into ``classes``). ``groups`` are patients (CSV ``patient_id``) or else the
    source images; ``sources`` the image each row was cut from; ``origins`` ``(N, 6)``
    float64 map rows back to source pixels (:func:`to_source_coords`).
    """

    images: np.ndarray
    boxes: np.ndarray
    box_labels: np.ndarray
    box_rows: np.ndarray
    groups: np.ndarray
    refs: tuple[str, ...]
    sources: np.ndarray
    origins: np.ndarray
    classes: tuple[str, ...]
    issues: tuple[LoadIssue, ...] = field(default=())
    groups_known: bool = False

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: np.ndarray) -> DetectionData:
        """The rows at ``index`` (in that order), boxes renumbered to the new rows."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        starts = np.searchsorted(self.box_rows, index, side="left")
        ends = np.searchsorted(self.box_rows, index, side="right")
        picks = [np.arange(s, e) for s, e in zip(starts, ends, strict=True)]
        box_index = np.concatenate(picks) if picks else np.zeros(0, np.int64)
        new_rows = np.repeat(np.arange(len(index), dtype=np.int64), ends - starts)
        return DetectionData(self.images[index], self.boxes[box_index],
                             self.box_labels[box_index], new_rows, self.groups[index],
                             tuple(self.refs[i] for i in index), self.sources[index],
                             self.origins[index], self.classes, self.issues,
                             self.groups_known)

    def boxes_of(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """``(k, 4)`` boxes and ``(k,)`` labels of one row."""
        start, end = np.searchsorted(self.box_rows, [row, row + 1])
        return self.boxes[start:end], self.box_labels[start:end]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays, no objects (for the site's data cache), read by :meth:`from_arrays`."""
        return {"images": self.images, "boxes": self.boxes, "box_labels": self.box_labels,
                "box_rows": self.box_rows, "groups": np.asarray(self.groups, dtype=str),
                "refs": np.array(self.refs, dtype=str),
                "sources": np.asarray(self.sources, dtype=str), "origins": self.origins,
                "classes": np.array(self.classes, dtype=str),
                "issues": issues_array(self.issues), "groups_known": np.array(self.groups_known)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> DetectionData:
        """The data written by :meth:`to_arrays`."""
        return cls(arrays["images"], arrays["boxes"], arrays["box_labels"], arrays["box_rows"],
                   arrays["groups"], tuple(arrays["refs"].tolist()), arrays["sources"],
                   arrays["origins"], tuple(arrays["classes"].tolist()),
                   issues_of(arrays["issues"]), bool(arrays["groups_known"]))


def to_source_coords(origin: DetectionData | np.ndarray, row: int | np.ndarray,
                     boxes: np.ndarray | None = None) -> np.ndarray:
    """Row boxes ``(k, 4)`` in the source image's pixels, float64.

    Call as ``to_source_coords(data, row, boxes)``, ``to_source_coords(origins, row,
    boxes)`` with an ``(N, 6)`` origins table, or ``to_source_coords(origin, boxes)`` with
    one row's ``(6,)`` origin (as :func:`image_rows` returns them).
    """
    table = origin.origins if isinstance(origin, DetectionData) else np.asarray(origin)
    if boxes is None:
        one, boxes = table, np.asarray(row)
    else:
        one = table[int(row)]
    x0, y0, sx, sy, pad_x, pad_y = np.asarray(one, dtype=np.float64).reshape(6)
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 0::2] = (out[:, 0::2] - pad_x) / sx + x0
    out[:, 1::2] = (out[:, 1::2] - pad_y) / sy + y0
    return out


def image_rows(pixels: np.ndarray, image: ImageConfig, *,
               tile: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One ``(C, H, W)`` image as harmonised rows ``(N, C, S, S)`` and their ``(N, 6)`` origins.

    The same windows and transforms as a site's data (used by ``medmeta predict``).
    """
    h, w = pixels.shape[-2:]
    windows = tile_windows(w, h, tile)
    stack = np.stack([pixels[:, y:y + th, x:x + tw] for x, y, tw, th in windows])
    rows = harmonise_stack(stack, size=image.size, channels=image.channels,
                           intensity=image.intensity)
    origins = np.stack([row_origin((x, y), (th, tw), image.size) for x, y, tw, th in windows])
    return rows, origins


def box_targets(data: DetectionData,
                index: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(boxes, labels)`` per row of ``index`` (all rows by default), e.g. for a detector."""
    rows = range(len(data)) if index is None else np.asarray(index, dtype=np.int64).tolist()
    return [data.boxes_of(int(r)) for r in rows]


# --- reading images, tiling and harmonising ------------------------------------------


@dataclass(frozen=True)
class _Row:
    pixels: np.ndarray  # (C, h, w) window of the source
    window: tuple[int, int]  # (x0, y0) in the source
    boxes: np.ndarray  # (k, 4) in window coordinates
    labels: np.ndarray  # (k,)
    ref: str
    source: str
    group: str


def build_detection(site: Annotations, entries: list[Entry], *, classes: tuple[str, ...],
                    size: int, channels: int, intensity: str, tile: int | None,
                    issues: IssueLog) -> DetectionData:
    """Read the selected images, check their boxes, tile and harmonise them (in order)."""
    index = {name: i for i, name in enumerate(classes)}
    rows: list[_Row] = []
    origins: list[np.ndarray] = []
    images: list[np.ndarray] = []
    pending: dict[tuple[int, ...], dict[int, np.ndarray]] = {}  # shape -> row -> raw pixels

    def flush(shape: tuple[int, ...]) -> None:
        """Harmonise the pending rows of one shape together, and let their raw pixels go."""
        batch = pending.pop(shape)
        stack = harmonise_stack(np.stack(list(batch.values())), size=size, channels=channels,
                                intensity=intensity)
        for i, harmonised in zip(batch, stack, strict=True):
            images[i] = harmonised

    for row in _rows(entries, index, tile, issues):
        shape = row.pixels.shape
        pending.setdefault(shape, {})[len(rows)] = row.pixels
        origins.append(row_origin(row.window, shape[-2:], size))
        images.append(np.empty(0, np.float32))
        rows.append(replace(row, pixels=np.empty(0, np.float32)))
        if len(pending[shape]) >= _BATCH:
            flush(shape)
    for shape in list(pending):
        flush(shape)
    boxes = [_to_row(o, r.boxes) for o, r in zip(origins, rows, strict=True)]
    return DetectionData(
        images=np.stack(images) if images else np.zeros((0, channels, size, size), np.float32),
        boxes=np.concatenate(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32),
        box_labels=np.concatenate([r.labels for r in rows]).astype(np.int64) if rows
        else np.zeros(0, np.int64),
        box_rows=np.repeat(np.arange(len(rows), dtype=np.int64), [len(r.boxes) for r in rows]),
        groups=np.array([r.group for r in rows], dtype=str), refs=tuple(r.ref for r in rows),
        sources=np.array([r.source for r in rows], dtype=str),
        origins=np.array(origins, dtype=np.float64).reshape(-1, 6), classes=classes,
        issues=tuple(issues.issues), groups_known=site.groups_known)


def row_origin(window: tuple[int, int], shape: tuple[int, ...], size: int) -> np.ndarray:
    """``(x0, y0, sx, sy, pad_x, pad_y)`` of a ``(h, w)`` window harmonised to ``size``.

    The resized side lengths are rounded exactly as MONAI ``Resize(size_mode="longest")``
    does, and the pad is the centring of ``transforms._pad_square``.
    """
    h, w = int(shape[0]), int(shape[1])
    scale = size / max(h, w)
    rh, rw = round(h * scale), round(w * scale)  # as MONAI: int(round(s * scale))
    return np.array([window[0], window[1], rw / w, rh / h, (size - rw) // 2, (size - rh) // 2],
                    dtype=np.float64)


def _to_row(origin: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Window-relative boxes to harmonised row pixels (inverse of :func:`to_source_coords`)."""
    _, _, sx, sy, pad_x, pad_y = origin
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 0::2] = out[:, 0::2] * sx + pad_x
    out[:, 1::2] = out[:, 1::2] * sy + pad_y
    return out


def _rows(entries: list[Entry], index: dict[str, int], tile: int | None,
          issues: IssueLog) -> Iterator[_Row]:
    """The rows (whole images or tiles) of every usable entry, bad ones reported."""
    for entry in entries:
        pixels = _checked_image(entry, issues)
        if pixels is None:
            continue
        kept = [b for b in entry.boxes if b.label in index]
        coords = np.array([b.coords for b in kept], dtype=np.float64).reshape(-1, 4)
        labels = np.array([index[b.label] for b in kept], dtype=np.int64)
        h, w = pixels.shape[-2:]
        for x0, y0, tw, th in tile_windows(w, h, tile):
            tile_boxes, keep = clip_boxes(coords, (x0, y0, x0 + tw, y0 + th))
            ref = entry.ref if (tw, th) == (w, h) else f"{entry.ref}#tile({x0},{y0})"
            yield _Row(pixels[:, y0:y0 + th, x0:x0 + tw], (x0, y0), tile_boxes, labels[keep],
                       ref, entry.ref, entry.group)


def _checked_image(entry: Entry, issues: IssueLog) -> np.ndarray | None:
    """The entry's ``(C, H, W)`` pixels, or ``None`` after reporting why it is skipped."""
    problems = list(entry.problems)
    pixels = None
    if not problems and entry.image is not None:
        try:
            pixels = read_image_file(entry.image, display_name=entry.ref).frames[0]
        except DataError as error:
            issues.report_error(error)
            return None
        h, w = pixels.shape[-2:]
        for box in entry.boxes:
            x_min, y_min, x_max, y_max = box.coords
            if x_min < 0 or y_min < 0 or x_max > w or y_max > h:
                corners = ", ".join(number_text(v) for v in box.coords)
                problems.append((box.where, f"box ({corners}) outside the {w}x{h} image"))
    for where, reason in problems:
        issues.report(where, f"{reason}; image {entry.ref} skipped")
    return None if problems else pixels


def tile_windows(width: int, height: int,
                 tile: int | None) -> list[tuple[int, int, int, int]]:
    """``(x0, y0, w, h)`` windows of an image: itself, or overlapping tiles covering it."""
    if tile is None or max(width, height) <= 1.5 * tile:
        return [(0, 0, width, height)]
    xs, ys = _positions(width, tile), _positions(height, tile)
    tw, th = min(width, tile), min(height, tile)
    return [(x, y, tw, th) for y in ys for x in xs]


def _positions(length: int, tile: int) -> list[int]:
    """Window starts along one axis: ``ceil(L / tile)`` evenly spaced from 0 to ``L - tile``."""
    if length <= tile:
        return [0]
    n = math.ceil(length / tile)
    return [int(p) for p in np.rint(np.linspace(0, length - tile, n))]


def clip_boxes(boxes: np.ndarray, window: tuple[int, int, int, int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Boxes clipped to ``window`` (x0, y0, x1, y1), window-relative, and which were kept.

    A box is kept when the clipped part has a positive size and at least
    :data:`KEEP_FRACTION` of the box's area.
    """
    x0, y0, x1, y1 = window
    clipped = np.column_stack([np.maximum(boxes[:, 0], x0), np.maximum(boxes[:, 1], y0),
                               np.minimum(boxes[:, 2], x1), np.minimum(boxes[:, 3], y1)])
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (cw > 0) & (ch > 0) & (cw * ch >= KEEP_FRACTION * area)
    return clipped[keep] - np.array([x0, y0, x0, y0], dtype=np.float64), np.flatnonzero(keep)
