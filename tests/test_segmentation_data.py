"""A segmentation site honours every data field a classification site has, or refuses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import client.tasks.segmentation as segmentation_module
from client.settings import SiteRuntime
from client.site import site_splits
from client.tasks import get_task
from medmeta_common.config import (
    DataConfig,
    ImageConfig,
    PartitionConfig,
    PrivacyConfig,
    load_config,
)
from medmeta_common.data.sources import load_segmentation
from medmeta_common.errors import ConfigError, DataError
from tests.conftest import shared_file

IMAGE = ImageConfig(size=32)


def pairs(folder: Path, names: list[str], *, broken: str | None = None) -> Path:
    """PNG image/mask pairs under ``image/`` and ``label/``; ``broken``'s mask is too small."""
    (folder / "image").mkdir(parents=True)
    (folder / "label").mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(
            folder / "image" / f"{name}.png")
        side = 20 if name == broken else 40
        mask = (rng.random((side, side)) > 0.5).astype(np.uint8) * 255
        Image.fromarray(mask).save(folder / "label" / f"{name}.png")
    return folder


def federation(tmp_path: Path, site: str) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text("sites:\n  - name: s\n" + site)
    return path


@pytest.mark.parametrize(("site", "field"), [
    ("    task: segmentation\n    data: {path: x, classes: [a, b]}\n", "sites[0].data.classes"),
    ("    task: segmentation\n    data: {path: x, group_key: patient}\n",
     "sites[0].data.group_key"),
    ("    data: {path: x}\n    tile: 256\n", "sites[0].tile"),
])
def test_fields_a_task_cannot_honour_are_refused_by_name(tmp_path: Path, site: str,
                                                         field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(federation(tmp_path, site))
    assert info.value.field == field
    assert str(tmp_path / "federation.yaml") in str(info.value)


def test_split_partition_and_frames_are_honoured() -> None:
    folder = shared_file("segmentation/brain_breast_mr")
    everything = load_segmentation(DataConfig(path=str(folder), split=None), IMAGE)
    volumes = set(everything.sources)
    assert len(volumes) == 3
    split = {s: set(load_segmentation(DataConfig(path=str(folder), split=s), IMAGE).sources)
             for s in ("train", "val", "test")}
    assert set.union(*split.values()) == volumes  # every volume in exactly one split...
    assert sum(len(v) for v in split.values()) == 3 and all(split.values())  # ...none cut
    parts = [set(load_segmentation(DataConfig(path=str(folder), split=None,
                                              partition=PartitionConfig(parts=3, index=i)),
                                   IMAGE).sources) for i in range(3)]
    assert [len(p) for p in parts] == [1, 1, 1] and set.union(*parts) == volumes
    middle = load_segmentation(DataConfig(path=str(folder), split=None, frames="middle"), IMAGE)
    # One slice of each volume (a single large slice is then tiled, as any 2-D image).
    assert len(middle) < len(everything) and set(middle.sources) == volumes
    assert all(r.endswith("#slice0") or "#tile" in r for r in middle.refs)


def test_strict_policy_stops_at_the_bad_pair_and_lenient_skips_it(tmp_path: Path) -> None:
    folder = pairs(tmp_path / "site", ["a", "b", "c"], broken="b")
    with pytest.raises(DataError, match=r"b\.png.*does not match"):
        load_segmentation(DataConfig(path=str(folder), split=None, policy="strict"), IMAGE)
    lenient = load_segmentation(DataConfig(path=str(folder), split=None), IMAGE)
    assert sorted(lenient.sources) == ["a.png", "c.png"]
    assert [i.file.endswith("b.png") for i in lenient.issues] == [True]


def write_manifest(folder: Path, rows: list[str]) -> None:
    (folder / "manifest.csv").write_text("image,mask,patient_id,split\n" + "\n".join(rows) + "\n")


def test_a_manifest_names_patients_and_the_patient_unit_samples_them(tmp_path: Path) -> None:
    folder = pairs(tmp_path / "site", ["a", "b", "c", "d"])
    write_manifest(folder, ["image/a.png,label/a.png,P1,train", "image/b.png,label/b.png,P1,train",
                            "image/c.png,label/c.png,P2,train", "image/d.png,label/d.png,P3,test",
                            "image/e.png,../label/e.png,P4,train"])
    train = load_segmentation(DataConfig(path=str(folder), split="train"), IMAGE)
    assert sorted(train.sources) == ["a.png", "b.png", "c.png"] and train.groups_known
    assert any("line 6" in i.file for i in train.issues)  # the path leaving the folder
    task = get_task("segmentation")
    patients = task.privacy_units(train, "patient", source="site s")
    records = task.privacy_units(train, "image", source="site s")
    assert len(set(patients)) == 2 and len(set(records)) == 3  # type: ignore[arg-type]
    without = load_segmentation(DataConfig(path=str(pairs(tmp_path / "plain", ["a", "b"])),
                                           split=None), IMAGE)
    with pytest.raises(ConfigError, match="names no patients") as info:
        task.privacy_units(without, "patient", source="site s")
    assert info.value.field == "privacy.unit"


def test_segmentation_data_is_served_from_the_site_cache(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = pairs(tmp_path / "site", ["a", "b", "c"])
    site = SiteRuntime(name="s", data=DataConfig(path=str(folder), split=None),
                       state_dir=tmp_path / "state", privacy=PrivacyConfig(),
                       task="segmentation")
    reads = []
    real = segmentation_module.load_segmentation
    monkeypatch.setattr(segmentation_module, "load_segmentation",
                        lambda *a, **k: reads.append(1) or real(*a, **k))
    first = site_splits(site, IMAGE, seed=0)
    import client.site as site_module

    site_module._SPLITS.clear()  # a fresh process
    again = site_splits(site, IMAGE, seed=0)
    assert reads == [1]  # the second process read the cache, not the images
    np.testing.assert_array_equal(first.train.masks, again.train.masks)
    assert first.train.refs == again.train.refs
