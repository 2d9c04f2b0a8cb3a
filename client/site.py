"""A site's local settings and data: who it is, where its images and state live.

These never leave the site. The data is read and harmonised once per process through
the site's task (and kept on disk in the state directory's cache), then split into
training and validation patients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from client.settings import SiteRuntime
from client.tasks import get_task
from client.tasks.base import Task, TaskData
from medmeta_common.config import DataConfig, ImageConfig
from medmeta_common.data.cache import cache_key, load_cached, store
from medmeta_common.data.splits import train_val_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSplits:
    """The site's training records and its patient-disjoint validation records."""

    train: Any
    val: Any


_SPLITS: dict[tuple, SiteSplits] = {}


def site_splits(site: SiteRuntime, image: ImageConfig, seed: int) -> SiteSplits:
    """Load (once per process) and split the site's data by patient/group."""
    key = (site.name, site.data, image, site.val_fraction, seed, site.task, site.tile)
    if key not in _SPLITS:
        task = get_task(site.task)
        data = load_site_data(site, image, task)
        groups = task.validation_groups(site.name, data)
        splits = SiteSplits(*train_val_split(data, groups, site.val_fraction, seed))
        log.info("site %s: %d training and %d validation %s", site.name, len(splits.train),
                 len(splits.val), task.rows)
        _SPLITS[key] = splits
    return _SPLITS[key]


def check_episode_classes(data: DataConfig, task: str, name: str) -> None:
    """Name the classes too small for a few-shot episode: warning, or error when strict."""
    if task != "classification":
        return
    from medmeta_common.data.inspect import check_sparse_classes
    from medmeta_common.data.sources import read_raw

    check_sparse_classes(read_raw(data), data.policy, f"site {name} ({data.path})")


def load_site_data(site: SiteRuntime, image: ImageConfig, task: Task) -> TaskData:
    """Harmonised site data, from the state directory's cache when the source is unchanged."""
    if not site.cache_data:
        return task.read(site.data, image, tile=site.tile)
    folder = site.state_dir / "data_cache"
    key = cache_key(site.data, image, task.name, site.tile)
    cached = load_cached(folder, key)
    if cached is not None:
        try:
            return task.from_arrays(cached)
        except (KeyError, ValueError) as exc:
            log.warning("site %s: ignoring a data cache of another layout (%s)", site.name, exc)
    data = task.read(site.data, image, tile=site.tile)
    store(folder, key, data.to_arrays())
    return data
