"""Harmonise every site's images to one channel count, size and intensity scale (MONAI).

Steps, per image: convert channels (grey <-> RGB), resize so the longest side is
``size`` (aspect kept, MONAI ``Resize``; area interpolation when shrinking), pad to a
square with the image's minimum value, then normalise intensity per image and channel
(``zscore``: the formula of MONAI ``NormalizeIntensity(channel_wise=True)``;
``minmax``: of ``ScaleIntensity(0, 1, channel_wise=True)``). Images of equal shape are
processed as one batch: MONAI's resize treats the batch as channels, and the
normalisation is vectorised because MONAI's per-channel loop costs ~0.4 ms per image.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from medmeta_common.data.issues import IssueLog
from medmeta_common.data.records import RawRecord, RawSite, SiteData

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def harmonise_stack(
    stack: np.ndarray, *, size: int, channels: int, intensity: str
) -> np.ndarray:
    """Harmonise an ``(N, C, H, W)`` stack of same-shape images to ``(N, channels, size, size)``."""
    import torch
    from monai.transforms import Resize

    stack = _convert_channels(np.asarray(stack, dtype=np.float32), channels)
    n, c, h, w = stack.shape
    if (h, w) != (size, size):
        mode = "area" if max(h, w) >= size else "bilinear"
        resize = Resize(spatial_size=size, size_mode="longest", mode=mode)
        planes = torch.from_numpy(np.ascontiguousarray(stack.reshape(n * c, h, w)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = np.asarray(resize(planes))
        stack = _pad_square(flat.reshape(n, c, *flat.shape[-2:]), size)
    return normalise_intensity(stack, intensity)


def normalise_intensity(stack: np.ndarray, intensity: str) -> np.ndarray:
    """Per image and channel: z-score, or min-max scaling to [0, 1]; flat images are kept flat."""
    stack = np.asarray(stack, dtype=np.float32)
    if intensity == "zscore":
        mean = stack.mean(axis=(-2, -1), keepdims=True)
        std = stack.std(axis=(-2, -1), keepdims=True)
        return (stack - mean) / np.where(std > 0, std, 1.0)
    if intensity == "minmax":
        low = stack.min(axis=(-2, -1), keepdims=True)
        span = stack.max(axis=(-2, -1), keepdims=True) - low
        return (stack - low) / np.where(span > 0, span, 1.0)
    raise ValueError(f"unknown intensity normalisation {intensity!r}")


def harmonise(
    site: RawSite,
    *,
    size: int,
    channels: int,
    intensity: str,
    issues: IssueLog | None = None,
) -> SiteData:
    """Turn a :class:`RawSite` into a :class:`SiteData` of identical-shape tensors.

    Records with non-finite pixels are reported through ``issues`` and skipped.
    """
    records = _finite_records(site.records, issues)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, record in enumerate(records):
        by_shape[record.pixels.shape].append(i)
    images = np.empty((len(records), channels, size, size), dtype=np.float32)
    for index in by_shape.values():
        stack = np.stack([records[i].pixels for i in index])
        images[index] = harmonise_stack(stack, size=size, channels=channels, intensity=intensity)
    reported = tuple(issues.issues) if issues is not None else tuple(site.issues)
    return SiteData(
        images=images,
        labels=np.array([r.label for r in records], dtype=np.int64),
        classes=site.classes,
        groups=np.array([r.group for r in records], dtype=str),
        refs=tuple(r.ref for r in records),
        issues=reported,
        groups_known=site.groups_known,
    )


def _finite_records(records: Sequence[RawRecord], issues: IssueLog | None) -> list[RawRecord]:
    kept = []
    for record in records:
        if np.isfinite(record.pixels).all():
            kept.append(record)
        elif issues is not None:
            issues.report(record.ref, "image contains NaN or infinite values")
    return kept


def _convert_channels(stack: np.ndarray, channels: int) -> np.ndarray:
    have = stack.shape[1]
    if have == channels:
        return stack
    if have == 1 and channels == 3:
        return np.repeat(stack, 3, axis=1)
    if have == 3 and channels == 1:
        return np.tensordot(stack, LUMA, axes=([1], [0]))[:, None]
    raise ValueError(f"cannot convert {have} channels to {channels}")


def _pad_square(stack: np.ndarray, size: int) -> np.ndarray:
    """Centre ``(N, C, h, w)`` images on a ``size`` square filled with each image's minimum."""
    n, c, h, w = stack.shape
    if (h, w) == (size, size):
        return stack
    fill = stack.reshape(n, -1).min(axis=1)
    out = np.broadcast_to(fill[:, None, None, None], (n, c, size, size)).copy()
    top, left = (size - h) // 2, (size - w) // 2
    out[:, :, top : top + h, left : left + w] = stack
    return out
