"""Read arrays from ``.npz`` files: MedMNIST-style splits or a plain image/label set.

MedMNIST layout: ``train_images``/``train_labels`` (and ``val_*``, ``test_*``), labels
shaped ``(N,)`` or ``(N, 1)``, optional ``classes``. Plain layout: ``images``,
``labels``, optional ``classes``, optional ``split`` and a group key such as
``source_image`` or ``patient_id``. Images are ``(N, H, W)``, ``(N, H, W, C)`` or
``(N, C, H, W)`` with ``C`` in {1, 3}. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from medmeta_common.data.records import SPLITS, RawRecord, RawSite
from medmeta_common.errors import DataError

GROUP_KEYS = ("patient_id", "source_image", "group", "groups", "patient")


def read_npz(path: Path, *, split: str | None, group_key: str | None = None) -> RawSite:
    """Read every record of ``split`` (or all splits when ``None``) from an npz file."""
    name = str(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise DataError(name, "file not found") from None
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(name, "holds Python objects (pickled); medmeta only reads plain "
                            "numeric/string arrays") from None
        raise DataError(name, f"not a readable .npz file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(name, f"not a readable .npz file ({type(exc).__name__}: {exc})") from None
    medmnist_splits = [s for s in SPLITS if f"{s}_images" in arrays]
    if medmnist_splits:
        return _read_medmnist(name, arrays, medmnist_splits, split)
    if "images" in arrays and "labels" in arrays:
        return _read_plain(name, arrays, split, group_key)
    raise DataError(name, "expected keys train_images/train_labels (MedMNIST layout) or "
                    f"images/labels; found {sorted(arrays)}")


def _read_medmnist(
    name: str, arrays: dict[str, np.ndarray], present: list[str], split: str | None
) -> RawSite:
    if split is not None and split not in present:
        raise DataError(name, f"has no {split!r} split; it has {', '.join(present)}")
    chosen = present if split is None else [split]
    label_sets = {s: _labels(name, arrays, f"{s}_labels") for s in chosen}
    classes = _classes(name, arrays, max(int(v.max(initial=-1)) for v in label_sets.values()) + 1)
    site = RawSite(root=name, format="npz-medmnist", classes=classes, groups_known=False)
    for s in chosen:
        images = _images(name, arrays, f"{s}_images", len(label_sets[s]))
        _check_range(name, f"{s}_labels", label_sets[s], len(classes))
        for i, (img, label) in enumerate(zip(images, label_sets[s], strict=True)):
            ref = f"{Path(name).name}:{s}[{i}]"
            site.records.append(RawRecord(img, int(label), ref, ref, "array", s))
    return site


def _read_plain(
    name: str, arrays: dict[str, np.ndarray], split: str | None, group_key: str | None
) -> RawSite:
    raw_labels = arrays["labels"]
    if raw_labels.dtype.kind in "US":
        label_names = raw_labels.reshape(-1).astype(str).tolist()
        classes = tuple(arrays["classes"].astype(str).tolist()) if "classes" in arrays else \
            tuple(sorted(set(label_names)))
        unknown = sorted(set(label_names) - set(classes))
        if unknown:
            raise DataError(name, f"labels {unknown} are not in the class list {list(classes)}")
        labels = np.array([classes.index(v) for v in label_names], dtype=np.int64)
    else:
        labels = _labels(name, arrays, "labels")
        classes = _classes(name, arrays, int(labels.max(initial=-1)) + 1)
        _check_range(name, "labels", labels, len(classes))
    images = _images(name, arrays, "images", len(labels))
    key = group_key or next((k for k in GROUP_KEYS if k in arrays), None)
    if group_key and group_key not in arrays:
        raise DataError(name, f"has no group key {group_key!r}; keys are {sorted(arrays)}")
    groups = arrays[key].reshape(-1).astype(str) if key else None
    if groups is not None and len(groups) != len(labels):
        raise DataError(name, f"{key!r} has {len(groups)} entries for {len(labels)} images")
    splits = arrays["split"].reshape(-1).astype(str) if "split" in arrays else None
    if splits is not None:
        bad = sorted(set(splits) - set(SPLITS))
        if bad or len(splits) != len(labels):
            raise DataError(name, f"'split' must hold one of {SPLITS} per image; found {bad}")
    site = RawSite(root=name, format="npz", classes=classes, groups_known=groups is not None)
    base = Path(name).name
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        record_split = splits[i] if splits is not None else None
        if split is not None and record_split is not None and record_split != split:
            continue
        ref = f"{base}:images[{i}]"
        group = str(groups[i]) if groups is not None else ref
        site.records.append(RawRecord(img, int(label), group, ref, "array", record_split))
    return site


def _labels(name: str, arrays: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in arrays:
        raise DataError(name, f"missing {key!r}")
    labels = arrays[key]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(name, f"{key!r} must be shaped (N,) or (N, 1); found {labels.shape} "
                        "(multi-label data is not supported)")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind == "f" and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise DataError(name, f"{key!r} must hold integer class indices; found {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise DataError(name, f"{key!r} holds a negative label ({int(labels.min())})")
    return labels.astype(np.int64)


def _classes(name: str, arrays: dict[str, np.ndarray], needed: int) -> tuple[str, ...]:
    if "classes" not in arrays:
        return tuple(str(i) for i in range(max(needed, 0)))
    classes = tuple(str(c) for c in arrays["classes"].reshape(-1))
    if len(set(classes)) != len(classes):
        raise DataError(name, f"'classes' has duplicate names: {list(classes)}")
    return classes


def _check_range(name: str, key: str, labels: np.ndarray, n_classes: int) -> None:
    bad = np.flatnonzero(labels >= n_classes)
    if bad.size:
        raise DataError(name, f"{key}[{int(bad[0])}] = {int(labels[bad[0]])} is not a class index "
                        f"(the class list has {n_classes} entries)")


def _images(name: str, arrays: dict[str, np.ndarray], key: str, count: int) -> np.ndarray:
    """Images as ``(N, C, H, W)`` (a view where possible)."""
    if key not in arrays:
        raise DataError(name, f"missing {key!r}")
    images = arrays[key]
    if images.dtype.kind not in "iuf" or images.dtype.kind == "c":
        raise DataError(name, f"{key!r} must be numeric; found {images.dtype}")
    if len(images) != count:
        raise DataError(name, f"{key!r} has {len(images)} images but there are {count} labels")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return np.moveaxis(images, -1, 1)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    raise DataError(name, f"{key!r} must be (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1 or 3; "
                    f"found {images.shape}")
