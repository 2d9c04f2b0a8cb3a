"""``data``: where a site's images are, and which of them to use."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from medmeta_common.config.typed import check

SYNTHETIC_PREFIX = "builtin:"


@dataclass(frozen=True)
class PartitionConfig:
    """Take one of ``parts`` patient-disjoint parts of a source (to simulate hospitals)."""

    parts: int
    index: int
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.parts >= 1, field="parts", expected="at least 1", found=self.parts)
        check(0 <= self.index < self.parts, field="index",
              expected=f"an integer in [0, {self.parts - 1}]", found=self.index)


@dataclass(frozen=True)
class DataConfig:
    """Where a site's images are, and which of them to use.

    Attributes
    ----------
    path : str
        A ``.npz`` file, a folder with a CSV manifest, a folder of class sub-folders,
        or ``builtin:demo/<site>`` for the built-in synthetic demo.
    split : {"train", "val", "test"} or None
        Split to read. Splits defined by the source are used as they are; otherwise
        records are split per patient/group with ``split_seed``. ``None`` reads all.
    classes : list of str, optional
        Keep only these classes (in this order); others are dropped.
    group_key : str, optional
        For plain ``.npz``: the array holding patient/group keys.
    partition : PartitionConfig, optional
        Keep one patient-disjoint part of the source.
    policy : {"strict", "lenient"}
        ``strict`` stops at the first bad file; ``lenient`` skips and reports each one.
    frames : {"middle", "all"} or None
        Multi-frame DICOM and 3-D volumes: keep the middle frame/slice, or all.
        ``None`` (default): the task's choice, the middle frame for classification,
        every slice for segmentation (:mod:`medmeta_common.config.tasks`).
    manifest : str
        Manifest file name inside a DICOM or segmentation folder.
    split_seed : int
        Seed of the per-group split when the source defines none.

    """

    path: str
    split: Literal["train", "val", "test"] | None = "train"
    classes: tuple[str, ...] | None = None
    group_key: str | None = None
    partition: PartitionConfig | None = None
    policy: Literal["strict", "lenient"] = "lenient"
    frames: Literal["middle", "all"] | None = None
    manifest: str = "manifest.csv"
    split_seed: int = 0

    def __post_init__(self) -> None:
        check(bool(self.path), field="path", expected="a file or folder path", found=self.path)
        if self.classes is not None:
            check(len(set(self.classes)) == len(self.classes) and len(self.classes) > 0,
                  field="classes", expected="a non-empty list of distinct class names",
                  found=list(self.classes))

    @property
    def is_builtin(self) -> bool:
        """True for the built-in synthetic demo data."""
        return self.path.startswith(SYNTHETIC_PREFIX)


def resolve_path(base: Path, value: str) -> str:
    """``value`` relative to ``base`` unless absolute or built-in."""
    if value.startswith(SYNTHETIC_PREFIX) or Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser()) if not value.startswith(SYNTHETIC_PREFIX) else value
    return str((base / value).resolve())


def with_resolved_path(data: DataConfig, base: Path) -> DataConfig:
    """A copy of ``data`` whose path is resolved against ``base``."""
    return replace(data, path=resolve_path(base, data.path))
