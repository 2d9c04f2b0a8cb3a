"""The site's on-disk data cache: reused while the source is unchanged, renewed after."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import client.site as site_module
import client.tasks.classification as classification_module
from client.settings import SiteRuntime
from client.site import site_splits
from medmeta_common.config import DataConfig, ImageConfig, PrivacyConfig


def runtime(tmp_path: Path, source: Path) -> SiteRuntime:
    return SiteRuntime(name="a", data=DataConfig(path=str(source), split="val"),
                       state_dir=tmp_path / "state", privacy=PrivacyConfig())


def test_cache_is_used_and_invalidated(tmp_path: Path, bccd_npz: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "bccd.npz"
    shutil.copy(bccd_npz, source)
    site = runtime(tmp_path, source)
    reads: list[str] = []
    real = classification_module.load_site
    monkeypatch.setattr(classification_module, "load_site",
                        lambda data, image: reads.append(data.path) or real(data, image))

    first = site_splits(site, ImageConfig(), seed=0)
    assert reads == [str(source)]  # the first process reads the images...
    assert len(list((site.state_dir / "data_cache").iterdir())) == 1

    site_module._SPLITS.clear()  # a fresh process
    again = site_splits(site, ImageConfig(), seed=0)
    assert reads == [str(source)]  # ...the next one is served from the cache
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert first.train.refs == again.train.refs and first.val.classes == again.val.classes

    site_module._SPLITS.clear()
    os.utime(source, ns=(1, 1))  # the source changed
    renewed = site_splits(site, ImageConfig(), seed=0)
    assert reads == [str(source)] * 2  # so the images are read again
    np.testing.assert_array_equal(first.train.images, renewed.train.images)
    assert len(list((site.state_dir / "data_cache").iterdir())) == 1  # old entry dropped


def test_cache_is_memory_mapped_and_a_damaged_entry_is_rebuilt(
        tmp_path: Path, bccd_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medmeta_common.data.cache import load_cached

    site = runtime(tmp_path, bccd_npz)
    first = site_splits(site, ImageConfig(), seed=0)
    (entry,) = (site.state_dir / "data_cache").iterdir()
    cached = load_cached(entry.parent, entry.name)
    assert cached is not None and cached["images"].shape[0] == len(first.train) + len(first.val)
    # Each array is read through a read-only memory map: a message reads the pages it uses.
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in cached.values())

    (entry / "images.npy").write_bytes(b"not an array")  # damaged (a disk error, a bad copy)
    site_module._SPLITS.clear()
    reads: list[str] = []
    real = classification_module.load_site
    monkeypatch.setattr(classification_module, "load_site",
                        lambda data, image: reads.append(data.path) or real(data, image))
    again = site_splits(site, ImageConfig(), seed=0)
    assert reads == [str(bccd_npz)]  # read from the source again, not from the damage
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert load_cached(entry.parent, entry.name) is not None  # and the entry is whole again
