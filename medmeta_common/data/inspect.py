"""What a site's data looks like, as a report safe to share.

The report holds counts only: images per class, number of patients/groups, image
sizes, modalities and the names of unreadable files with reasons. It never holds
DICOM identifying fields (names, IDs, dates, UIDs) or patient/group keys.

It also names the classes with fewer images than one few-shot episode needs (K
support + Q query images, :data:`EPISODE_IMAGES` by default), with their files: often
a typo in a manifest's label column. :func:`check_sparse_classes` makes that a warning
under the lenient bad-file policy and an error under the strict one.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Any

from medmeta_common.config import FewShotConfig
from medmeta_common.data.records import RawRecord, RawSite
from medmeta_common.errors import DataError

log = logging.getLogger(__name__)

# Images one class needs for a default episode: K support + Q query.
EPISODE_IMAGES = FewShotConfig().shots + FewShotConfig().queries
# Files named per sparse class (a typo'd label usually has one or two).
FILES_SHOWN = 10


def shown_ref(record: RawRecord) -> str:
    """A record's file as the report may name it: a patient key in its path is masked.

    Sites often file images under a folder per patient (``P315/img00045.dcm``); the
    report never names patients, so the key is replaced by ``<patient>`` (the file
    stays findable through the manifest row that lists it).
    """
    group = record.group
    if group and group != record.ref and len(group) > 1 and group in record.ref:
        return record.ref.replace(group, "<patient>")
    return record.ref


def sparse_classes(site: RawSite, needed: int = EPISODE_IMAGES) -> list[dict[str, Any]]:
    """Classes with at least one but fewer than ``needed`` images, and their files."""
    files: dict[int, list[str]] = defaultdict(list)
    for record in site.records:
        files[record.label].append(shown_ref(record))
    return [{"class": site.classes[label], "images": len(refs), "needed": needed,
             "files": sorted(refs)[:FILES_SHOWN]}
            for label, refs in sorted(files.items()) if len(refs) < needed]


def describe_sparse(sparse: list[dict[str, Any]]) -> list[str]:
    """One line per sparse class, naming its files."""
    lines = []
    for entry in sparse:
        more = entry["images"] - len(entry["files"])
        names = ", ".join(entry["files"]) + (f", ... {more} more" if more > 0 else "")
        lines.append(f"class {entry['class']!r} has {entry['images']} image(s), fewer than the "
                     f"{entry['needed']} one episode needs (K+Q): {names}")
    return lines


def check_sparse_classes(site: RawSite, policy: str, source: str,
                         needed: int = EPISODE_IMAGES) -> list[dict[str, Any]]:
    """Warn (lenient) or raise :class:`DataError` (strict) for classes too small for an episode."""
    sparse = sparse_classes(site, needed)
    lines = describe_sparse(sparse)
    if lines and policy == "strict":
        raise DataError(source, "; ".join(lines) + " (strict policy; a label typo? fix the "
                        "manifest, or list the real classes with --classes / data.classes)")
    for line in lines:
        log.warning("%s: %s (a label typo? data.classes makes unknown labels errors)", source,
                    line)
    return sparse


def inspection_report(site: RawSite, split: str | None,
                      needed: int = EPISODE_IMAGES) -> dict[str, Any]:
    """Summarise a decoded site; the first four keys are the stable ``--json`` schema."""
    labels = Counter(r.label for r in site.records)
    sizes = Counter("x".join(str(d) for d in r.pixels.shape[-2:]) for r in site.records)
    channels = Counter(int(r.pixels.shape[0]) for r in site.records)
    return {
        "images": len(site.records),
        "classes": {name: labels.get(i, 0) for i, name in enumerate(site.classes)},
        "groups": len({r.group for r in site.records}),
        "errors": [{"file": i.file, "reason": i.reason} for i in site.issues],
        "format": site.format,
        "split": split,
        "groups_from_source": site.groups_known,
        "sizes": dict(sizes.most_common()),
        "channels": {str(k): v for k, v in sorted(channels.items())},
        "modalities": dict(Counter(r.modality for r in site.records).most_common()),
        "sparse_classes": sparse_classes(site, needed),
    }


def format_report(report: dict[str, Any], path: str) -> str:
    """The report as text for a terminal."""
    lines = [
        f"{path}  ({report['format']}, split: {report['split'] or 'all'})",
        f"images: {report['images']}",
        "classes:",
    ]
    width = max((len(n) for n in report["classes"]), default=0)
    lines += [f"  {name:<{width}}  {count}" for name, count in report["classes"].items()]
    empty = [n for n, c in report["classes"].items() if c == 0]
    if empty:
        lines.append(f"  warning: no images for {', '.join(empty)}")
    for line in describe_sparse(report.get("sparse_classes", [])):
        lines.append(f"  warning: {line} (a label typo? --classes makes unknown labels "
                     "errors)")
    groups_note = "" if report["groups_from_source"] else \
        " (the source has no patient ids: each image or file is its own group)"
    lines.append(f"patients/groups: {report['groups']}{groups_note}")
    lines.append("image sizes (HxW): " + _counts(report["sizes"]))
    lines.append("channels: " + _counts(report["channels"]))
    lines.append("modalities: " + _counts(report["modalities"]))
    errors = report["errors"]
    lines.append(f"unreadable files: {len(errors)}")
    lines += [f"  {e['file']}: {e['reason']}" for e in errors]
    return "\n".join(lines)


def _counts(counts: dict[str, int], limit: int = 8) -> str:
    items = list(counts.items())
    text = ", ".join(f"{k} ({v})" for k, v in items[:limit])
    if len(items) > limit:
        text += f", ... {len(items) - limit} more"
    return text or "-"
