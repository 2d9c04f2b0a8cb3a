"""A site's local settings and data: who it is, where its images and state live.

These never leave the site. The data is read and harmonised once per process and
kept in memory (a simulation actor serves many rounds of the same site).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from medmeta_common.checkpoint import atomic_torch_save, torch_load
from medmeta_common.config import DataConfig, ImageConfig, PrivacyConfig
from medmeta_common.data.cache import cache_key, load_cached, store
from medmeta_common.data.records import SiteData
from medmeta_common.data.sources import load_site
from medmeta_common.data.splits import train_val_split
from medmeta_common.models.heads import CosineClassifier

log = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
ROTATION_FILE = "rotation_head.pt"


@dataclass(frozen=True)
class SiteRuntime:
    """Everything a site decides for itself."""

    name: str
    data: DataConfig
    state_dir: Path
    privacy: PrivacyConfig
    val_fraction: float = 0.2
    device: str = "auto"
    amp: bool = True
    threads: int = 1
    cache_data: bool = True
    task: str = "classification"
    tile: int = 128


@dataclass(frozen=True)
class SiteSplits:
    """The site's training records and its patient-disjoint validation records."""

    train: SiteData
    val: SiteData


_SPLITS: dict[tuple, SiteSplits] = {}


def site_splits(site: SiteRuntime, image: ImageConfig, seed: int) -> SiteSplits:
    """Load (once per process) and split the site's data by patient/group."""
    key = (site.name, site.data, image, site.val_fraction, seed)
    if key not in _SPLITS:
        data = _load_with_cache(site, image)
        splits = SiteSplits(*train_val_split(data, data.groups, site.val_fraction, seed))
        log.info("site %s: %d training and %d validation images, %d classes", site.name,
                 len(splits.train), len(splits.val), len(data.classes))
        _SPLITS[key] = splits
    return _SPLITS[key]


def _load_with_cache(site: SiteRuntime, image: ImageConfig) -> SiteData:
    """Harmonised site data, from the state directory's cache when the source is unchanged."""
    if not site.cache_data:
        return load_site(site.data, image)
    folder = site.state_dir / "data_cache"
    key = cache_key(site.data, image)
    data = load_cached(folder, key)
    if data is None:
        data = load_site(site.data, image)
        store(folder, key, data)
    return data


def site_seed(name: str, seed: int) -> int:
    """A per-site seed, stable across processes (Python's hash() is not)."""
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def load_head(site: SiteRuntime, classes: tuple[str, ...], dim: int, scale: float,
              seed: int) -> CosineClassifier:
    """The site's persistent cosine head, or a fresh data-independent one."""
    path = site.state_dir / HEAD_FILE
    head = CosineClassifier(dim, len(classes), scale)
    if path.exists():
        saved = torch_load(path)
        shape = tuple(saved["weight"].shape)
        if tuple(saved["classes"]) == classes and shape == (len(classes), dim):
            head.weight.data.copy_(saved["weight"])
            return head
        log.warning("site %s: saved head does not match the class list or encoder; starting a "
                    "new head", site.name)
    generator = torch.Generator().manual_seed(site_seed(site.name, seed))
    head.weight.data.copy_(torch.randn(len(classes), dim, generator=generator) * 0.1)
    return head


def save_head(site: SiteRuntime, head: CosineClassifier, classes: tuple[str, ...]) -> None:
    """Persist the site's head (it never leaves the site)."""
    atomic_torch_save(site.state_dir / HEAD_FILE,
                      {"classes": list(classes), "weight": head.weight.detach().cpu()})


def load_rotation_head(site: SiteRuntime, dim: int, seed: int) -> torch.nn.Linear:
    """The site's persistent 4-way rotation head, or a fresh data-independent one."""
    path = site.state_dir / ROTATION_FILE
    head = torch.nn.Linear(dim, 4)
    if path.exists():
        saved = torch_load(path)
        if tuple(saved["weight"].shape) == (4, dim):
            head.load_state_dict(saved)
            return head
    generator = torch.Generator().manual_seed(site_seed(site.name, seed) + 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4, dim, generator=generator) * 0.01)
        head.bias.zero_()
    return head


def save_rotation_head(site: SiteRuntime, head: torch.nn.Linear) -> None:
    """Persist the site's rotation head (it never leaves the site)."""
    atomic_torch_save(site.state_dir / ROTATION_FILE,
                      {k: v.detach().cpu() for k, v in head.state_dict().items()})
