"""An on-disk cache of a site's harmonised images, kept in the site's state directory.

In production every Flower message starts a fresh ClientApp process, which would
decode and harmonise the site's whole data set again each round. The cache keeps the
result as an ``.npz`` keyed by the data and image settings and by a fingerprint of
the source files (paths, sizes, modification times), so any change to the data or
the settings makes a new entry. It never leaves the site.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from medmeta_common.checkpoint import atomic_write
from medmeta_common.config import DataConfig, ImageConfig
from medmeta_common.data.records import LoadIssue, SiteData

log = logging.getLogger(__name__)


def source_fingerprint(data: DataConfig) -> str:
    """Paths, sizes and modification times of everything the source reads."""
    if data.is_builtin:
        return data.path
    root = Path(data.path)
    entries = []
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        if path.is_file():
            entries.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def cache_key(data: DataConfig, image: ImageConfig) -> str:
    """Key of a cache entry: settings and source fingerprint."""
    text = json.dumps({"data": asdict(data), "image": asdict(image),
                       "source": source_fingerprint(data), "version": 1}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_cached(folder: Path, key: str) -> SiteData | None:
    """The cached site data, or ``None`` (a damaged entry is ignored and replaced)."""
    path = folder / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            return SiteData(
                images=saved["images"], labels=saved["labels"],
                classes=tuple(saved["classes"].tolist()), groups=saved["groups"],
                refs=tuple(saved["refs"].tolist()),
                issues=tuple(LoadIssue(f, r) for f, r in saved["issues"].tolist()))
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring a damaged data cache %s (%s)", path, exc)
        return None


def store(folder: Path, key: str, site: SiteData) -> None:
    """Write a cache entry atomically (and drop older entries of this site)."""
    issues = np.array([[i.file, i.reason] for i in site.issues], dtype=str).reshape(-1, 2)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{key}.npz", lambda handle: np.savez(
        handle, images=site.images, labels=site.labels, classes=np.array(site.classes),
        groups=site.groups, refs=np.array(site.refs), issues=issues))
    for old in folder.glob("*.npz"):
        if old.stem != key:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
