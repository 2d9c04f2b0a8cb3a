"""A folder with one sub-folder of images per class.

Each sub-folder's name is a class; every image below it (any depth) is one record,
or several under the ``all`` frame policy. DICOM files are grouped by their
PatientID; other files are each their own group (say so in the inspection report).
"""

from __future__ import annotations

import os
from pathlib import Path

from medmeta_common.data.images import FramePolicy, looks_like_image, read_image_file
from medmeta_common.data.issues import IssueLog
from medmeta_common.data.records import RawSite, frame_records
from medmeta_common.errors import DataError


def class_folders(root: Path) -> list[Path]:
    """The visible sub-folders of ``root``, sorted by name."""
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DataError(str(root), f"cannot list the folder ({exc.strerror or exc})") from None


def read_class_folders(
    root: Path,
    *,
    classes: tuple[str, ...] | None,
    frames: FramePolicy,
    issues: IssueLog,
) -> RawSite:
    """Decode every image under ``root/<class>/``."""
    folders = {p.name: p for p in class_folders(root)}
    if classes is not None:
        missing = [c for c in classes if c not in folders]
        if missing:
            raise DataError(str(root), f"no sub-folder for class(es) {missing}; found "
                            f"{sorted(folders)}")
        folders = {c: folders[c] for c in classes}
    site = RawSite(root=str(root), format="class-folders", classes=tuple(folders))
    groups_from_dicom = False
    for label, (name, folder) in enumerate(folders.items()):
        files = _walk(folder, root, issues)
        if not files:
            issues.report(str(folder.relative_to(root)), f"class {name!r} has no image files")
            continue
        for path in files:
            rel = path.relative_to(root).as_posix()
            if not looks_like_image(path):
                issues.report(rel, "not an image file (expected DICOM, PNG, JPEG, BMP, TIFF, "
                              "NIfTI or NRRD)")
                continue
            try:
                decoded = read_image_file(path, frames=frames, display_name=rel)
            except DataError as exc:
                issues.report_error(exc)
                continue
            groups_from_dicom |= decoded.patient_id is not None
            site.records += frame_records(decoded.frames, rel=rel, label=label,
                                          group=decoded.patient_id or rel,
                                          modality=decoded.modality)
    site.groups_known = groups_from_dicom
    return site


def _walk(folder: Path, root: Path, issues: IssueLog) -> list[Path]:
    found: list[Path] = []

    def on_error(exc: OSError) -> None:
        where = Path(exc.filename).relative_to(root) if exc.filename else folder
        issues.report(str(where), f"cannot read the folder ({exc.strerror or exc})")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return found
