"""Segmentation sites: images with masks, from volumes, image/mask pairs and large tiles.

Layouts recognised under a site folder (pairs are matched by file name; a pair whose
image or mask cannot be read is reported and skipped, never half-used):

- a CSV manifest (``manifest.csv`` by default, ``data.manifest``) with the columns
  ``image,mask,patient_id`` and optionally ``split``, paths relative to the folder:
  the only layout that names patients (needed for ``privacy.unit: patient``);
- ``image/`` + ``label/`` (or ``images/`` + ``masks/``) sub-folders, files of the same
  stem: PNG, JPEG, TIFF, NIfTI, NRRD or DICOM;
- files ``<stem>_image.<ext>`` + ``<stem>_label.<ext>`` (e.g. NRRD or NIfTI volumes with
  their label volumes), or ``<stem>img<rest>`` + ``<stem>mask<rest>`` (e.g. TIFF).

Policy (documented in docs/data.md):

- **Volumes** are cut into 2-D slices along their last axis (``data.frames: middle``
  keeps only the middle slice). Every slice with foreground is kept, plus
  background-only slices evenly spaced through the volume, at most as many as the
  foreground slices (so empty slices do not swamp training).
- **Large 2-D images** (longest side above 1.5 x ``tile``) are cut into non-overlapping
  ``tile`` x ``tile`` tiles (the remainder at the right and bottom edges is dropped),
  with the same foreground/background policy.
- **Masks** are binary: any value above 0 is foreground (instance masks become
  semantic masks). The mask must have the image's height and width.
- Slices and tiles are harmonised like classification images (channels, longest side
  to ``size`` with area/bilinear resampling, square padding, per-image intensity
  normalisation); masks follow with nearest-neighbour resampling and pad with 0.

Every slice or tile keeps its source (volume or image) and its patient (the manifest's,
else the source): splits never cut a patient, and the privacy record of a
segmentation site is a whole source image, all its slices or tiles together.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medmeta_common.data.images import looks_like_image, read_image_file, suffix_of
from medmeta_common.data.issues import IssueLog
from medmeta_common.data.manifest import inside, read_rows
from medmeta_common.data.records import (
    SPLITS,
    LoadIssue,
    RawRecord,
    RawSite,
    issues_array,
    issues_of,
)
from medmeta_common.data.transforms import harmonise_stack
from medmeta_common.errors import DataError

CLASSES = ("background", "foreground")
MANIFEST_COLUMNS = ("image", "mask", "patient_id")
_FOLDER_PAIRS = (("image", "label"), ("images", "masks"), ("images", "labels"))
_NAME_PAIRS = (("_image", "_label"), ("img", "mask"))


@dataclass(frozen=True)
class SegmentationData:
    """Harmonised images ``(N, C, S, S)`` float32 and masks ``(N, S, S)`` int64 (0/1).

    ``groups`` are patients (from a manifest) or, without one, the source images;
    ``sources`` the image or volume each slice or tile was cut from.
    """

    images: np.ndarray
    masks: np.ndarray
    groups: np.ndarray
    refs: tuple[str, ...]
    sources: np.ndarray
    classes: tuple[str, ...] = CLASSES
    issues: tuple[LoadIssue, ...] = field(default=())
    groups_known: bool = False

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def subset(self, index: np.ndarray) -> SegmentationData:
        """The slices/tiles at ``index``."""
        index = np.asarray(index, dtype=np.int64)
        return SegmentationData(self.images[index], self.masks[index], self.groups[index],
                                tuple(self.refs[i] for i in index), self.sources[index],
                                self.classes, self.issues, self.groups_known)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for the site's data cache), read back by :meth:`from_arrays`."""
        return {"images": self.images, "masks": self.masks, "groups": self.groups,
                "refs": np.array(self.refs, dtype=str), "sources": self.sources,
                "classes": np.array(self.classes, dtype=str),
                "issues": issues_array(self.issues), "groups_known": np.array(self.groups_known)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SegmentationData:
        """The data written by :meth:`to_arrays`."""
        return cls(arrays["images"], arrays["masks"], arrays["groups"],
                   tuple(arrays["refs"].tolist()), arrays["sources"],
                   tuple(arrays["classes"].tolist()), issues_of(arrays["issues"]),
                   bool(arrays["groups_known"]))

    @property
    def foreground_fraction(self) -> float:
        """Share of foreground pixels (a quick sanity figure for `data inspect`)."""
        return float(self.masks.mean()) if self.masks.size else 0.0


def find_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` file pairs under ``folder`` (see the module docstring)."""
    if not folder.is_dir():
        raise DataError(str(folder), "segmentation data must be a folder of images and masks")
    for image_dir, mask_dir in _FOLDER_PAIRS:
        if (folder / image_dir).is_dir() and (folder / mask_dir).is_dir():
            masks = {_stem(p): p for p in (folder / mask_dir).iterdir() if looks_like_image(p)}
            return [(p, masks[_stem(p)]) for p in sorted((folder / image_dir).iterdir())
                    if looks_like_image(p) and _stem(p) in masks]
    files = {p.name: p for p in sorted(folder.iterdir()) if looks_like_image(p)}
    pairs = []
    for name, path in files.items():
        for image_token, mask_token in _NAME_PAIRS:
            if image_token in name:
                partner = files.get(name.replace(image_token, mask_token, 1))
                if partner is not None:
                    pairs.append((path, partner))
                break
    return pairs


@dataclass(frozen=True)
class _Pair:
    image: Path
    mask: Path
    patient: str | None = None
    split: str | None = None


def _manifest_pairs(folder: Path, manifest: Path, issues: IssueLog) -> list[_Pair]:
    """The pairs a segmentation manifest lists; bad rows reported by line."""
    rows = read_rows(manifest, MANIFEST_COLUMNS)
    pairs = []
    for line, row in rows:
        where = f"{manifest.name} line {line}"
        split = row.get("split", "").lower() or None
        image, mask = inside(folder, row["image"]), inside(folder, row["mask"])
        if image is None or mask is None:
            issues.report(where, "image and mask must be paths inside the site folder")
        elif not row["patient_id"]:
            issues.report(where, "empty patient_id")
        elif split is not None and split not in SPLITS:
            issues.report(where, f"split must be one of {', '.join(SPLITS)}; found {split!r}")
        else:
            pairs.append(_Pair(image, mask, row["patient_id"], split))
    return pairs


def decode_segmentation(folder: Path, *, manifest: str, frames: str, tile: int,
                        issues: IssueLog) -> RawSite:
    """Read every pair, slice or tile it, and keep what the policy keeps (as raw records)."""
    if (folder / manifest).is_file():
        pairs = _manifest_pairs(folder, folder / manifest, issues)
    else:
        pairs = [_Pair(i, m) for i, m in find_pairs(folder)]
    if not pairs and not issues.issues:
        raise DataError(str(folder), "no image/mask pairs found (expected a manifest.csv "
                        "with image,mask,patient_id, image/ + label/ folders, or files named "
                        "*_image.* + *_label.*, or *img* + *mask*)")
    site = RawSite(root=str(folder), format="segmentation", classes=CLASSES,
                   groups_known=(folder / manifest).is_file())
    for pair in pairs:
        try:
            pixels, labels = _read_pair(pair.image, pair.mask)
        except DataError as error:
            issues.report_error(error)
            continue
        if frames == "middle" and len(labels) > 1:
            middle = slice(len(labels) // 2, len(labels) // 2 + 1)
            pixels, labels = pixels[middle], labels[middle]
        source = pair.image.name
        for index in _keep(labels, tile):
            site.records.append(RawRecord(
                pixels[index[0]][(slice(None), *index[1:])], 0, pair.patient or source,
                f"{source}#{_describe(index)}", "image", pair.split, source,
                labels[index[0]][index[1:]]))
    site.issues = list(issues.issues)
    return site


def harmonise_segmentation(site: RawSite, *, size: int, channels: int,
                           intensity: str) -> SegmentationData:
    """Turn a segmentation :class:`RawSite` into :class:`SegmentationData`."""
    records = site.records
    images = [r.pixels for r in records]
    masks = [r.mask for r in records]
    out_images = np.empty((len(images), channels, size, size), np.float32)
    for index in _same_shape_order(images):
        out_images[index] = harmonise_stack(np.stack([images[i] for i in index]),
                                            size=size, channels=channels, intensity=intensity)
    out_masks = np.empty((len(masks), size, size), np.int64)
    for index in _same_shape_order(masks):  # type: ignore[arg-type]
        out_masks[index] = resize_masks(np.stack([masks[i] for i in index]), size)
    return SegmentationData(out_images, out_masks,
                            np.array([r.group for r in records], dtype=str),
                            tuple(r.ref for r in records),
                            np.array([r.source for r in records], dtype=str),
                            issues=tuple(site.issues), groups_known=site.groups_known)


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """``(N, H, W)`` 0/1 masks to ``(N, size, size)``: nearest, longest side, 0 padding."""
    import torch
    from monai.transforms import Resize

    n, h, w = masks.shape
    if (h, w) != (size, size):
        resize = Resize(spatial_size=size, size_mode="longest", mode="nearest")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            masks = np.asarray(resize(torch.from_numpy(masks.astype(np.float32))))
        padded = np.zeros((n, size, size), dtype=np.float32)
        top, left = (size - masks.shape[1]) // 2, (size - masks.shape[2]) // 2
        padded[:, top:top + masks.shape[1], left:left + masks.shape[2]] = masks
        masks = padded
    return (masks > 0.5).astype(np.int64)


def _read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(F, C, H, W)`` and binary masks ``(F, H, W)`` of one pair, checked."""
    pixels = read_image_file(image_path, frames="all").frames
    labels = read_image_file(mask_path, frames="all").frames
    if labels.shape[1] != 1:
        labels = labels.max(axis=1, keepdims=True)  # an RGB mask: any channel above 0
    if pixels.shape[0] != labels.shape[0] or pixels.shape[-2:] != labels.shape[-2:]:
        raise DataError(str(mask_path), f"mask shape {labels.shape[-2:]} x {labels.shape[0]} "
                        f"frames does not match its image {image_path.name} "
                        f"({pixels.shape[-2:]} x {pixels.shape[0]} frames)")
    return pixels, (labels[:, 0] > 0).astype(np.int64)


def _keep(labels: np.ndarray, tile: int) -> list[tuple]:
    """Indices ``(frame, rows, cols)`` of the slices/tiles kept by the documented policy."""
    frames, h, w = labels.shape
    if frames == 1 and max(h, w) > 1.5 * tile:
        candidates = [(0, slice(r, r + tile), slice(c, c + tile))
                      for r in range(0, h - tile + 1, tile) for c in range(0, w - tile + 1, tile)]
    else:
        candidates = [(f, slice(None), slice(None)) for f in range(frames)]
    has_fg = [bool(labels[i[0]][i[1:]].any()) for i in candidates]
    foreground = [c for c, fg in zip(candidates, has_fg, strict=True) if fg]
    background = [c for c, fg in zip(candidates, has_fg, strict=True) if not fg]
    room = min(len(background), max(len(foreground), 1 if not foreground else 0))
    picks: list[int] = np.linspace(0, len(background) - 1, room).round().astype(int).tolist() \
        if room else []
    kept = foreground + [background[i] for i in picks]
    return sorted(kept, key=lambda c: (c[0], c[1].start or 0, c[2].start or 0))


def _describe(index: tuple) -> str:
    frame, rows, cols = index
    if rows.start is None:
        return f"slice{frame}"
    return f"tile{rows.start}_{cols.start}"


def _same_shape_order(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Indices of ``arrays`` grouped by shape (each group is processed as one batch)."""
    shapes: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        shapes.setdefault(a.shape, []).append(i)
    return [np.array(v) for v in shapes.values()]


def _stem(path: Path) -> str:
    return path.name[: -len(suffix_of(path))] if suffix_of(path) else path.name
