"""An on-disk cache of a site's harmonised data, kept in the site's state directory.

In production every Flower message starts a fresh ClientApp process, which would
decode and harmonise the site's whole data set again each round. The cache keeps the
result (the arrays of any task's data) as an ``.npz`` keyed by the data and image
settings, the task, and a fingerprint of the source files (paths, sizes,
modification times), so any change to the data or the settings makes a new entry.
It never leaves the site.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from medmeta_common.checkpoint import atomic_write
from medmeta_common.config import DataConfig, ImageConfig
from medmeta_common.config.tasks import DEFAULT_TILE

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


def cache_key(data: DataConfig, image: ImageConfig, task: str = "classification",
              tile: int = DEFAULT_TILE) -> str:
    """Key of a cache entry: settings, task and source fingerprint."""
    text = json.dumps({"data": asdict(data), "image": asdict(image), "task": task,
                       "tile": tile, "source": source_fingerprint(data), "version": 2},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_cached(folder: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or ``None`` (a damaged entry is ignored and replaced)."""
    path = folder / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            return {name: saved[name] for name in saved.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("ignoring a damaged data cache %s (%s)", path, exc)
        return None


def store(folder: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write a cache entry atomically (and drop older entries of this site)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{key}.npz", lambda handle: np.savez(handle, **arrays))  # type: ignore[arg-type]
    for old in folder.glob("*.npz"):
        if old.stem != key:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
