"""Plain containers for site data, before and after harmonisation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LoadIssue:
    """One file that could not be used, and why (never its contents)."""

    file: str
    reason: str


@dataclass
class RawRecord:
    """One decoded image with its label, before any resizing or normalisation.

    Attributes
    ----------
    pixels : np.ndarray
        Channel-first ``(C, H, W)`` float32, in the source's own intensity units
        (after DICOM rescale and windowing).
    label : int
        Index into the site's class list.
    group : str
        Patient (or source slide) the record belongs to; splits never cut a group.
        Used only for grouping, never printed.
    ref : str
        Where it came from: a path relative to the site root, or ``file.npz:key[i]``.
    modality : str
        DICOM modality code (``MR``, ``CT``...), or a generic kind (``image``, ``array``).
    split : str | None
        The split the source assigned, if any.
    source : str
        The image this record was cut from (a volume's slices and a large image's
        tiles share it); empty: the record is a whole image of its own.
    mask : np.ndarray | None
        Segmentation: the record's ``(H, W)`` 0/1 mask (``label`` is then 0).

    """

    pixels: np.ndarray
    label: int
    group: str
    ref: str
    modality: str = "image"
    split: str | None = None
    source: str = ""
    mask: np.ndarray | None = None


def frame_records(frames: np.ndarray, *, rel: str, label: int, group: str, modality: str,
                  split: str | None = None) -> list[RawRecord]:
    """One record per frame of a decoded file (``rel#frameK`` when it has several)."""
    return [RawRecord(frame, label, group, rel if len(frames) == 1 else f"{rel}#frame{k}",
                      modality, split) for k, frame in enumerate(frames)]


@dataclass
class RawSite:
    """Everything read from one site's data source, bad files listed by name."""

    root: str
    format: str
    classes: tuple[str, ...]
    records: list[RawRecord] = field(default_factory=list)
    issues: list[LoadIssue] = field(default_factory=list)
    groups_known: bool = True


@dataclass(frozen=True)
class SiteData:
    """A site's harmonised images, ready for training or adaptation.

    Attributes
    ----------
    images : np.ndarray
        ``(N, C, S, S)`` float32 after the configured MONAI transforms.
    labels : np.ndarray
        ``(N,)`` int64 class indices into ``classes``.
    classes : tuple[str, ...]
        Class names, in label order.
    groups : np.ndarray
        ``(N,)`` patient/group keys (strings).
    refs : tuple[str, ...]
        Source reference of each record (for error reports and predictions).
    issues : tuple[LoadIssue, ...]
        Files that were skipped, with reasons (lenient policy).
    groups_known : bool
        Whether ``groups`` come from the source (patient ids); otherwise every record
        is its own group, and a patient-level privacy unit cannot be honoured.

    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    groups: np.ndarray
    refs: tuple[str, ...]
    issues: tuple[LoadIssue, ...] = ()
    groups_known: bool = True

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: np.ndarray) -> SiteData:
        """The records at ``index`` (integer positions), same class list."""
        index = np.asarray(index, dtype=np.int64)
        return SiteData(
            images=self.images[index],
            labels=self.labels[index],
            classes=self.classes,
            groups=self.groups[index],
            refs=tuple(self.refs[i] for i in index),
            issues=self.issues,
            groups_known=self.groups_known,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for the site's data cache), read back by :meth:`from_arrays`."""
        return {"images": self.images, "labels": self.labels,
                "classes": np.array(self.classes, dtype=str), "groups": self.groups,
                "refs": np.array(self.refs, dtype=str), "issues": issues_array(self.issues),
                "groups_known": np.array(self.groups_known)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SiteData:
        """The data written by :meth:`to_arrays`."""
        return cls(images=arrays["images"], labels=arrays["labels"],
                   classes=tuple(arrays["classes"].tolist()), groups=arrays["groups"],
                   refs=tuple(arrays["refs"].tolist()), issues=issues_of(arrays["issues"]),
                   groups_known=bool(arrays["groups_known"]))

    def class_counts(self) -> dict[str, int]:
        """Number of records per class name (classes with none included)."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts, strict=True)}


def issues_array(issues: tuple[LoadIssue, ...]) -> np.ndarray:
    """Load issues as an ``(n, 2)`` string array (file, reason)."""
    return np.array([[i.file, i.reason] for i in issues], dtype=str).reshape(-1, 2)


def issues_of(array: np.ndarray) -> tuple[LoadIssue, ...]:
    """The load issues of :func:`issues_array`."""
    return tuple(LoadIssue(str(f), str(r)) for f, r in array.tolist())
