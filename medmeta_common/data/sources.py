"""One entry point to read a site's data, whatever its format and task.

``read_raw`` finds the format, decodes (for segmentation: image/mask pairs, sliced and
tiled), and selects the split, classes and partition, under the configured bad-file
policy; ``load_site`` (classification) and ``load_segmentation`` also harmonise the
images (see :mod:`.transforms`). ``load_detection`` reads images with boxes (Pascal VOC,
COCO JSON or a CSV of boxes, :mod:`.detection`).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from medmeta_common.config import SYNTHETIC_PREFIX, DataConfig, ImageConfig
from medmeta_common.config.tasks import DEFAULT_TILE, TaskName, frames_for
from medmeta_common.data.box_annotations import Annotations, Entry, read_annotations
from medmeta_common.data.detection import DetectionData, build_detection
from medmeta_common.data.folders import class_folders, read_class_folders
from medmeta_common.data.issues import IssueLog
from medmeta_common.data.manifest import read_manifest_folder
from medmeta_common.data.npz import read_npz
from medmeta_common.data.records import RawSite, SiteData
from medmeta_common.data.segmentation import (
    SegmentationData,
    decode_segmentation,
    harmonise_segmentation,
)
from medmeta_common.data.splits import partition_by_group, split_by_group
from medmeta_common.data.synthetic import demo_site
from medmeta_common.data.transforms import harmonise
from medmeta_common.errors import DataError

log = logging.getLogger(__name__)


def detect_format(path: Path, manifest: str = "manifest.csv") -> str:
    """Name the layout of ``path``: ``npz``, ``manifest`` or ``class-folders``."""
    if not path.exists():
        raise DataError(str(path), "no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        raise DataError(str(path), "a single file is not a site; give a .npz file, a folder "
                        f"with {manifest}, or a folder of class sub-folders")
    if (path / manifest).is_file():
        return "manifest"
    if class_folders(path):
        return "class-folders"
    raise DataError(str(path), f"found neither {manifest} nor class sub-folders; give a .npz "
                    f"file, a folder with {manifest} (file,label,patient_id[,split]), or a folder "
                    "with one sub-folder of images per class")


def read_raw(data: DataConfig, issues: IssueLog | None = None, *,
             task: TaskName = "classification", tile: int = DEFAULT_TILE) -> RawSite:
    """Decode a site's records and select split, classes and partition.

    Parameters
    ----------
    data : DataConfig
        The site's data settings (path already resolved).
    issues : IssueLog, optional
        Where bad files go; defaults to one following ``data.policy``.
    task : str
        What the records are for: ``segmentation`` reads image/mask pairs.
    tile : int
        Segmentation: the tile side for large 2-D images.

    """
    issues = issues or IssueLog(data.policy)
    site = _decode_segmentation(data, issues, tile) if task == "segmentation" else \
        _decode(data, issues)
    site = _select_split(site, data)
    if data.classes is not None:
        site = _select_classes(site, data.classes)
    if data.partition is not None:
        p = data.partition
        keep = partition_by_group([r.group for r in site.records], p.parts, p.index, p.seed)
        site = replace(site, records=[site.records[i] for i in keep])
    site.issues = list(issues.issues)
    return site


def load_site(
    data: DataConfig, image: ImageConfig, issues: IssueLog | None = None
) -> SiteData:
    """Read, select and harmonise a site's data; :class:`DataError` when nothing is usable."""
    issues = issues or IssueLog(data.policy)
    raw = read_raw(data, issues)
    if not raw.records:
        raise DataError(data.path, _empty_reason(raw, data))
    return harmonise(raw, size=image.size, channels=image.channels,
                     intensity=image.intensity, issues=issues)


def load_segmentation(data: DataConfig, image: ImageConfig, *, tile: int = DEFAULT_TILE,
                      issues: IssueLog | None = None) -> SegmentationData:
    """Read, select and harmonise a segmentation site; :class:`DataError` when nothing is usable."""
    issues = issues or IssueLog(data.policy)
    raw = read_raw(data, issues, task="segmentation", tile=tile)
    if not raw.records:
        raise DataError(data.path, _empty_reason(raw, data))
    return harmonise_segmentation(raw, size=image.size, channels=image.channels,
                                  intensity=image.intensity)


def _decode_segmentation(data: DataConfig, issues: IssueLog, tile: int) -> RawSite:
    if data.is_builtin:
        raise DataError(data.path, "the built-in demo has no segmentation data; give a folder "
                        "of image/mask pairs")
    return decode_segmentation(Path(data.path), manifest=data.manifest,
                               frames=frames_for("segmentation", data), tile=tile,
                               issues=issues)


def _decode(data: DataConfig, issues: IssueLog) -> RawSite:
    if data.path.startswith(SYNTHETIC_PREFIX):
        name = data.path[len(SYNTHETIC_PREFIX):]
        if not name.startswith("demo/"):
            raise DataError(data.path, "unknown built-in data; use builtin:demo/site-0 ... site-3")
        return demo_site(name.removeprefix("demo/"), seed=data.split_seed)
    path = Path(data.path)
    frames = frames_for("classification", data)
    fmt = detect_format(path, data.manifest)
    if fmt == "npz":
        return read_npz(path, split=data.split, group_key=data.group_key)
    if fmt == "manifest":
        return read_manifest_folder(path, manifest=data.manifest, split=data.split,
                                    classes=data.classes, frames=frames, issues=issues)
    return read_class_folders(path, classes=data.classes, frames=frames, issues=issues)


def _select_split(site: RawSite, data: DataConfig) -> RawSite:
    """Keep ``data.split``: the source's own split if it has one, else a per-group split."""
    if data.split is None:
        return site
    if site.records and all(r.split is not None for r in site.records):
        kept = [r for r in site.records if r.split == data.split]
    else:
        names = split_by_group([r.group for r in site.records], seed=data.split_seed)
        kept = [r for r, s in zip(site.records, names, strict=True) if s == data.split]
    return replace(site, records=kept)


def _select_classes(site: RawSite, classes: tuple[str, ...]) -> RawSite:
    missing = [c for c in classes if c not in site.classes]
    if missing:
        raise DataError(site.root, f"class(es) {missing} not found; the source has "
                        f"{list(site.classes)}")
    new_index = {site.classes.index(c): i for i, c in enumerate(classes)}
    kept = [replace(r, label=new_index[r.label]) for r in site.records if r.label in new_index]
    return replace(site, classes=tuple(classes), records=kept)


def _empty_reason(raw: RawSite, data: DataConfig) -> str:
    if raw.issues:
        return f"no usable images ({len(raw.issues)} bad file(s): " + "; ".join(
            f"{i.file}: {i.reason}" for i in raw.issues[:3]) + ")"
    return f"no images in split {data.split!r}" if data.split else "no images found"



def load_detection(data: DataConfig, image: ImageConfig, *, tile: int | None = None,
                   issues: IssueLog | None = None) -> DetectionData:
    """Read, select and harmonise a detection site; :class:`DataError` when nothing is usable.

    Split, partition and classes are chosen per source image (or patient) before any
    image is read, so a bad image outside the selection costs nothing and is not
    reported; see :mod:`.detection` for the layouts, the box checks and tiling.
    """
    issues = issues or IssueLog(data.policy)
    if data.is_builtin:
        raise DataError(data.path, "the built-in demo has no detection data; give a Pascal VOC "
                        "folder, a COCO .json file or a folder with boxes.csv")
    site = read_annotations(Path(data.path), manifest=data.manifest, split=data.split,
                            issues=issues)
    classes = data.classes or site.classes
    missing = [c for c in classes if c not in site.classes]
    if missing:
        raise DataError(data.path, f"class(es) {missing} not found; the source has "
                        f"{list(site.classes)}")
    entries = _select_detection(site, data)
    result = build_detection(site, entries, classes=tuple(classes), size=image.size,
                             channels=image.channels, intensity=image.intensity, tile=tile,
                             issues=issues)
    if not len(result):
        if issues.issues:
            reason = f"no usable images ({len(issues.issues)} bad file(s): " + "; ".join(
                f"{i.file}: {i.reason}" for i in issues.issues[:3]) + ")"
        elif data.split is not None:
            listed = f" ({site.split_list} lists none)" if site.split_list is not None else ""
            reason = f"no images in split {data.split!r}{listed}"
        else:
            reason = "no annotated images found"
        raise DataError(data.path, reason)
    return result


def _select_detection(site: Annotations, data: DataConfig) -> list[Entry]:
    """The source images of ``data.split`` and ``data.partition`` (never cutting a group)."""
    entries = site.entries
    if data.split is not None:
        if site.split_list is not None or (entries and all(e.split for e in entries)):
            entries = [e for e in entries if e.split == data.split]
        else:
            names = split_by_group([e.group for e in entries], seed=data.split_seed)
            entries = [e for e, s in zip(entries, names, strict=True) if s == data.split]
    if data.partition is not None and entries:
        p = data.partition
        keep = partition_by_group([e.group for e in entries], p.parts, p.index, p.seed)
        entries = [entries[i] for i in keep]
    return entries
