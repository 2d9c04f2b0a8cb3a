"""Reading a detection source's annotations: Pascal VOC, COCO JSON or a CSV of boxes.

Only the annotation files are parsed here (no image is read); every bad box is noted
on its image's :class:`Entry` with where it was written (CSV line, VOC ``<object>``
number, COCO annotation id), and the image is later reported and skipped whole
(:mod:`medmeta_common.data.detection` has the policy, the tiling and the harmonising).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medmeta_common.data.issues import IssueLog
from medmeta_common.data.manifest import inside, read_rows
from medmeta_common.data.records import SPLITS
from medmeta_common.errors import DataError

CSV_NAME = "boxes.csv"
CSV_COLUMNS = ("file", "x_min", "y_min", "x_max", "y_max", "label")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Box:
    """One annotated box as the source gives it, with where it was written."""

    where: str
    coords: tuple[float, float, float, float]
    label: str


@dataclass
class Entry:
    """One source image and its boxes, before the image is read.

    ``problems`` are ``(where, reason)`` of bad boxes (or a bad annotation file) found
    while parsing; an entry with any is reported and skipped when it is selected.
    """

    ref: str
    image: Path | None
    group: str
    split: str | None = None
    boxes: list[Box] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Annotations:
    """Every image a detection source describes, and its class names."""

    root: Path
    format: str
    entries: list[Entry]
    classes: tuple[str, ...]
    groups_known: bool = False
    split_list: Path | None = None  # VOC: the ImageSets list of the requested split


def detect_detection_format(path: Path, manifest: str = "manifest.csv") -> str:
    """Name the detection layout of ``path``: ``voc``, ``coco`` or ``csv``."""
    if not path.exists():
        raise DataError(str(path), "no such file or folder")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "coco"
        raise DataError(str(path), "a single detection file must be a COCO .json")
    if (path / "Annotations").is_dir():
        return "voc"
    if _csv_path(path, manifest) is not None:
        return "csv"
    if _coco_path(path) is not None:
        return "coco"
    raise DataError(str(path), "found no detection annotations: expected Annotations/*.xml + "
                    "JPEGImages/ (Pascal VOC), one COCO .json file, or boxes.csv with columns "
                    + ",".join(CSV_COLUMNS))


def read_annotations(path: Path, *, manifest: str, split: str | None,
                     issues: IssueLog) -> Annotations:
    """Parse a detection source's annotations (no image is read yet)."""
    fmt = detect_detection_format(path, manifest)
    if fmt == "voc":
        return _read_voc(path, split, issues)
    if fmt == "coco":
        json_path = path if path.is_file() else _coco_path(path)
        assert json_path is not None
        return _read_coco(json_path, issues)
    csv_path = _csv_path(path, manifest)
    assert csv_path is not None
    return _read_csv(path, csv_path, issues)


def _read_voc(root: Path, split: str | None, issues: IssueLog) -> Annotations:
    """Pascal VOC: one XML per image; ``ImageSets/Main/<split>.txt`` selects a split."""
    entries = []
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        entries.append(_voc_entry(root, xml_path))
    names = tuple(sorted({b.label for e in entries for b in e.boxes}))
    site = Annotations(root, "voc", entries, names)
    split_list = root / "ImageSets" / "Main" / f"{split}.txt"
    if split is not None and split_list.is_file():
        site.split_list = split_list
        by_stem = {Path(e.ref).stem: e for e in entries}
        for line, text in enumerate(split_list.read_text(encoding="utf-8").splitlines(), 1):
            if not text.split():
                continue
            stem = text.split()[0]
            if stem in by_stem:
                by_stem[stem].split = split
            else:
                issues.report(f"ImageSets/Main/{split}.txt line {line}",
                              f"lists {stem!r} but Annotations/{stem}.xml does not exist")
    return site


def _voc_entry(root: Path, xml_path: Path) -> Entry:
    rel = f"Annotations/{xml_path.name}"
    try:
        tree = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        entry = Entry(xml_path.stem, None, xml_path.stem)
        entry.problems.append((rel, f"unreadable annotation XML ({type(exc).__name__}: {exc})"))
        return entry
    filename = (tree.findtext("filename") or "").strip()
    image = _voc_image(root / "JPEGImages", filename, xml_path.stem)
    ref = image.name if image is not None else (filename or xml_path.stem)
    entry = Entry(ref, image, ref)
    if image is None:
        entry.problems.append((rel, f"no image for it in JPEGImages/ (looked for "
                               f"{filename or xml_path.stem + '.*'!r})"))
    for number, obj in enumerate(tree.iter("object"), 1):
        where = f"{rel} object {number}"
        box = obj.find("bndbox")
        values = [None if box is None else box.findtext(k)
                  for k in ("xmin", "ymin", "xmax", "ymax")]
        _add_box(entry, where, values, (obj.findtext("name") or "").strip())
    return entry


def _voc_image(folder: Path, filename: str, stem: str) -> Path | None:
    """The image ``<filename>`` names, else the XML stem with a common suffix."""
    if filename and inside(folder, filename) is not None and (folder / filename).is_file():
        return folder / filename
    for suffix in _IMAGE_SUFFIXES + tuple(s.upper() for s in _IMAGE_SUFFIXES):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _read_coco(json_path: Path, issues: IssueLog) -> Annotations:
    """COCO: ``images``, ``annotations`` (``bbox`` = x, y, w, h) and ``categories``."""
    name = json_path.name
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
        images, annotations = doc["images"], doc.get("annotations", [])
        categories = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
        by_id = {int(im["id"]): str(im["file_name"]) for im in images}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(str(json_path), f"unreadable COCO JSON ({type(exc).__name__}: "
                        f"{exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(str(json_path), "not COCO detection JSON: needs images[{id,file_name}], "
                        f"annotations[{{id,image_id,bbox,category_id}}], categories[{{id,name}}] "
                        f"({type(exc).__name__}: {exc})") from None
    folder = json_path.parent
    entries: dict[int, Entry] = {}
    for image_id, rel in by_id.items():
        path = inside(folder, rel)
        if path is not None and not path.is_file() and (folder / "images").is_dir():
            path = inside(folder / "images", rel)
        entries[image_id] = Entry(rel, path, rel)
        if path is None:
            entries[image_id].problems.append(
                (f"{name} image {image_id}", "file_name leaves the JSON's folder"))
    for number, ann in enumerate(annotations, 1):
        ann_id = ann.get("id", f"#{number}") if isinstance(ann, dict) else f"#{number}"
        where = f"{name} annotation {ann_id}"
        if not isinstance(ann, dict) or ann.get("image_id") not in entries:
            bad_id = ann.get("image_id") if isinstance(ann, dict) else None
            issues.report(where, f"image_id {bad_id!r} is not in images; annotation skipped")
            continue
        entry = entries[ann["image_id"]]
        category = ann.get("category_id")
        if category not in categories:
            entry.problems.append((where, f"unknown category_id {category!r} (the file declares "
                                   f"{sorted(categories)})"))
            continue
        values = _coco_corners(ann.get("bbox"))
        if values is None:
            entry.problems.append((where, f"bbox must be 4 numbers [x, y, w, h]; found "
                                   f"{ann.get('bbox')!r}"))
            continue
        _add_box(entry, where, values, categories[category])
    classes = tuple(categories[k] for k in sorted(categories))
    return Annotations(json_path.parent, "coco", list(entries.values()), classes)


def _coco_corners(bbox: object) -> list[object] | None:
    """``[x, y, w, h]`` to corners; ``None`` unless four numbers."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _read_csv(root: Path, csv_path: Path, issues: IssueLog) -> Annotations:
    """CSV: one row per box; ``patient_id`` and ``split`` columns are optional."""
    rows = read_rows(csv_path, CSV_COLUMNS)
    header = rows[0][1].keys()
    has_patient, has_split = "patient_id" in header, "split" in header
    entries: dict[str, Entry] = {}
    rejected: set[str] = set()
    for line, row in rows:
        where = f"{csv_path.name} line {line}"
        rel = row["file"]
        path = inside(root, rel) if rel else None
        if path is None:
            issues.report(where, "file must be a path inside the site folder" if rel
                          else "empty 'file' entry")
            continue
        split = (row.get("split") or "").lower() or None
        if has_split and split not in SPLITS:
            # Reported now: an image of no valid split would never be selected to report it.
            issues.report(where, f"split must be one of {', '.join(SPLITS)}; found "
                          f"{row.get('split')!r}; image {rel} skipped")
            rejected.add(rel)
            continue
        patient = row.get("patient_id", "") if has_patient else rel
        entry = entries.setdefault(rel, Entry(rel, path, patient or rel, split))
        if has_patient and not patient:
            entry.problems.append((where, "empty patient_id"))
        elif patient != entry.group:
            entry.problems.append((where, f"{rel} has patient {entry.group!r} on an earlier line"))
        if split != entry.split:
            entry.problems.append((where, f"{rel} has split {entry.split!r} on an earlier line"))
        values: list[object] = [row[c] for c in CSV_COLUMNS[1:5]]
        if not any(values) and not row["label"]:
            continue  # an image listed without boxes
        _add_box(entry, where, values, row["label"])
    kept = [e for rel, e in entries.items() if rel not in rejected]
    names = tuple(sorted({b.label for e in kept for b in e.boxes}))
    return Annotations(root, "csv", kept, names, groups_known=has_patient)


def _add_box(entry: Entry, where: str, values: Sequence[object], label: str) -> None:
    """Check a box's numbers, size and label; record it or its problem on ``entry``."""
    try:
        x_min, y_min, x_max, y_max = (float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        entry.problems.append((where, f"non-numeric box coordinates {values!r}"))
        return
    if not all(math.isfinite(v) for v in (x_min, y_min, x_max, y_max)):
        entry.problems.append((where, f"non-finite box coordinates {values!r}"))
        return
    if not label:
        entry.problems.append((where, "box without a label"))
        return
    size_problem = _size_problem(x_min, y_min, x_max, y_max)
    if size_problem:
        entry.problems.append((where, size_problem))
        return
    entry.boxes.append(Box(where, (x_min, y_min, x_max, y_max), label))


def _size_problem(x_min: float, y_min: float, x_max: float, y_max: float) -> str:
    parts = []
    for axis, low, high in (("x", x_min, x_max), ("y", y_min, y_max)):
        if high == low:
            parts.append(f"{axis}_min={axis}_max={number_text(low)}")
        elif high < low:
            parts.append(f"{axis}_max={number_text(high)} < {axis}_min={number_text(low)}")
    if not parts:
        return ""
    kind = "zero-size" if all("<" not in p for p in parts) else "negative-size"
    return f"{kind} box ({', '.join(parts)})"


def number_text(value: float) -> str:
    """A coordinate as written in a message: ``504``, not ``504.0``."""
    return str(int(value)) if value.is_integer() else str(value)


def _csv_path(folder: Path, manifest: str) -> Path | None:
    if manifest.lower().endswith(".csv") and (folder / manifest).is_file():
        try:
            read_rows(folder / manifest, CSV_COLUMNS)
            return folder / manifest
        except DataError:
            pass
    return folder / CSV_NAME if (folder / CSV_NAME).is_file() else None


def _coco_path(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.json"))
    if len(found) == 1:
        return found[0]
    return folder / "annotations.json" if (folder / "annotations.json").is_file() else None
