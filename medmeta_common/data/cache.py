"""An on-disk cache of a site's harmonised data, kept in the site's state directory.

In production every Flower message starts a fresh ClientApp process, which would
decode and harmonise the site's whole data set again each round. The cache keeps the
result (the arrays of any task's data) as a folder of ``.npy`` files keyed by the data
and image settings, the task, and a fingerprint of the source files (paths, sizes,
modification times), so any change to the data or the settings makes a new entry.
The arrays are memory-mapped read-only when loaded: a message reads only the pages
it touches, and nothing can change the cached data by accident. It never leaves the
site.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import IO

import numpy as np

from medmeta_common.checkpoint import atomic_write
from medmeta_common.config import DataConfig, ImageConfig
from medmeta_common.config.tasks import DEFAULT_TILE

log = logging.getLogger(__name__)

# Written last into an entry: the names of its arrays.
COMPLETE = "arrays.json"


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
                       "tile": tile, "source": source_fingerprint(data), "version": 3},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_cached(folder: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, memory-mapped, or ``None`` (a damaged entry is ignored)."""
    entry = folder / key
    if not (entry / COMPLETE).exists():
        return None
    try:
        names = json.loads((entry / COMPLETE).read_text())
        return {name: np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                for name in names}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring a damaged data cache %s (%s)", entry, exc)
        return None


def _save(handle: IO[bytes], array: np.ndarray) -> None:
    np.save(handle, array, allow_pickle=False)


def store(folder: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write a cache entry atomically (and drop older entries of this site).

    The ``.npy`` files are written into a temporary folder that is renamed into place
    once complete, so a reader sees a whole entry or none.
    """
    bad = [name for name in arrays if not name.replace("_", "").replace("-", "").isalnum()]
    if bad:
        raise ValueError(f"data cache array names must be alphanumeric, got {bad}")
    folder.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder))
    try:
        for name, array in arrays.items():
            atomic_write(building / f"{name}.npy", functools.partial(_save, array=array))
        atomic_write(building / COMPLETE, lambda handle: handle.write(
            json.dumps(sorted(arrays)).encode()))
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(folder / key)  # a damaged entry of the same key
        os.replace(building, folder / key)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    for old in folder.iterdir():
        if old.name != key and not old.name.startswith("."):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(old) if old.is_dir() else os.unlink(old)
