"""What a site's data looks like, as a report safe to share.

The report holds counts only: images per class, number of patients/groups, image
sizes, modalities and the names of unreadable files with reasons. It never holds
DICOM identifying fields (names, IDs, dates, UIDs) or patient/group keys.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from medmeta_common.data.records import RawSite


def inspection_report(site: RawSite, split: str | None) -> dict[str, Any]:
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
    rare = [n for n, c in report["classes"].items() if 0 < c < 3]
    if rare:
        lines.append(f"  warning: very few images for {', '.join(rare)} (a label typo? "
                     "--classes makes unknown labels errors)")
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
