"""A folder of image files (usually DICOM) described by a CSV manifest.

The manifest (``manifest.csv`` at the folder's root by default) has the columns
``file,label,patient_id`` and optionally ``split``; ``file`` is relative to the folder
and may not point outside it.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from medmeta_common.data.images import FramePolicy, read_image_file
from medmeta_common.data.issues import IssueLog
from medmeta_common.data.records import SPLITS, RawSite, frame_records
from medmeta_common.errors import DataError

REQUIRED_COLUMNS = ("file", "label", "patient_id")


def read_manifest_folder(
    root: Path,
    *,
    manifest: str,
    split: str | None,
    classes: tuple[str, ...] | None,
    frames: FramePolicy,
    issues: IssueLog,
) -> RawSite:
    """Decode every file the manifest lists (of ``split``, when given)."""
    rows = read_rows(root / manifest)
    has_split = rows and "split" in rows[0][1]
    known = classes or tuple(sorted({row["label"] for _, row in rows if row["label"]}))
    site = RawSite(root=str(root), format="manifest", classes=known)
    for line, row in rows:
        where = f"{manifest} line {line}"
        rel = row["file"]
        if not rel:
            issues.report(where, "empty 'file' entry")
            continue
        record_split = (row.get("split") or "").strip().lower() if has_split else None
        if has_split and record_split not in SPLITS:
            issues.report(rel, f"{where}: split must be one of {', '.join(SPLITS)}; "
                          f"found {row.get('split')!r}")
            continue
        if split is not None and record_split is not None and record_split != split:
            continue
        if row["label"] not in known:
            issues.report(rel, f"{where}: label {row['label']!r} is not in the class list "
                          f"{list(known)}")
            continue
        if not row["patient_id"]:
            issues.report(rel, f"{where}: empty patient_id (needed to split by patient)")
            continue
        path = inside(root, rel)
        if path is None:
            issues.report(rel, f"{where}: path leaves the site folder; give it relative to "
                          f"{root}")
            continue
        try:
            decoded = read_image_file(path, frames=frames, display_name=rel)
        except DataError as exc:
            issues.report_error(exc)
            continue
        site.records += frame_records(decoded.frames, rel=rel, label=known.index(row["label"]),
                                      group=row["patient_id"], modality=decoded.modality,
                                      split=record_split)
    return site


def read_rows(path: Path, required: tuple[str, ...] = REQUIRED_COLUMNS
              ) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV manifest whose header names ``required`` columns.

    Column names are matched case-insensitively and cells stripped; a missing column,
    an unreadable file or an empty manifest is a :class:`DataError` naming the file.
    """
    name = str(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(name, f"missing column(s) {', '.join(missing)}; the header must "
                                f"name {', '.join(required)}[,split] (found {header})")
            reader.fieldnames = header
            rows = [
                (reader.line_num, {k: (v or "").strip() for k, v in row.items() if k})
                for row in reader
            ]
    except FileNotFoundError:
        raise DataError(name, "manifest not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(name, f"unreadable manifest ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise DataError(name, "manifest lists no files")
    return rows


def inside(root: Path, rel: str) -> Path | None:
    """``root / rel`` if it stays inside ``root``, else ``None``."""
    pure = PurePosixPath(rel.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        return None
    return root / pure
