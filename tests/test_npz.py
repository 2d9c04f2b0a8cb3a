"""MedMNIST-style and plain .npz sites, on the real arrays in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medmeta_common.config import DataConfig, ImageConfig, PartitionConfig
from medmeta_common.data.npz import read_npz
from medmeta_common.data.sources import load_site, read_raw
from medmeta_common.errors import DataError

BRAIN_TRAIN = {"glioma_tumor": 826, "meningioma_tumor": 822, "no_tumor": 395,
               "pituitary_tumor": 827}


def test_brain_train_split_counts(brain_npz: Path) -> None:
    site = read_raw(DataConfig(path=str(brain_npz), split="train"))
    counts = {c: sum(r.label == i for r in site.records) for i, c in enumerate(site.classes)}
    assert counts == BRAIN_TRAIN
    assert site.format == "npz-medmnist"


def test_labels_shaped_n1_are_accepted(pbc_npz: Path) -> None:
    site = read_npz(pbc_npz, split="val")
    with np.load(pbc_npz) as raw:
        expected = raw["val_labels"][:, 0]
    assert [r.label for r in site.records] == expected.tolist()
    assert site.classes[0] == "eosinophil"


def test_pixels_are_unchanged_channel_first(pbc_npz: Path) -> None:
    site = read_npz(pbc_npz, split="test")
    with np.load(pbc_npz) as raw:
        first = raw["test_images"][0]
    assert site.records[0].pixels.shape == (3, 28, 28)
    np.testing.assert_array_equal(site.records[0].pixels, np.moveaxis(first, -1, 0))


def test_missing_split_names_the_available_ones(brain_npz: Path) -> None:
    with pytest.raises(DataError, match="has no 'val' split; it has train, test"):
        read_npz(brain_npz, split="val")


def test_plain_npz_groups_by_source_image(bccd_npz: Path) -> None:
    site = read_raw(DataConfig(path=str(bccd_npz), split=None))
    with np.load(bccd_npz) as raw:
        assert [r.group for r in site.records] == raw["source_image"].tolist()
    assert site.groups_known


def test_plain_npz_split_never_cuts_a_slide(bccd_npz: Path) -> None:
    parts = {s: read_raw(DataConfig(path=str(bccd_npz), split=s)) for s in ("train", "val", "test")}
    groups = {s: {r.group for r in p.records} for s, p in parts.items()}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert sum(len(p.records) for p in parts.values()) == 1733


def test_load_site_harmonises_to_config(bccd_npz: Path) -> None:
    site = load_site(DataConfig(path=str(bccd_npz), split="val"),
                     ImageConfig(size=24, channels=1, intensity="minmax"))
    assert site.images.shape[1:] == (1, 24, 24)
    assert site.images.min() >= 0.0 and site.images.max() <= 1.0
    assert len(site) == len(site.refs) == len(site.groups)


def test_class_subset_relabels(pbc_npz: Path) -> None:
    site = read_raw(DataConfig(path=str(pbc_npz), split="val", classes=("platelet", "eosinophil")))
    assert site.classes == ("platelet", "eosinophil")
    assert {r.label for r in site.records} == {0, 1}


def test_unknown_class_is_named(pbc_npz: Path) -> None:
    with pytest.raises(DataError, match="basophil"):
        read_raw(DataConfig(path=str(pbc_npz), classes=("basophil",)))


def test_partitions_are_disjoint_and_cover(bccd_npz: Path) -> None:
    parts = [
        read_raw(DataConfig(path=str(bccd_npz), split=None,
                            partition=PartitionConfig(parts=3, index=i)))
        for i in range(3)
    ]
    refs = [{r.ref for r in p.records} for p in parts]
    groups = [{r.group for r in p.records} for p in parts]
    assert sum(len(r) for r in refs) == 1733
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((3, 8, 8)), "labels": np.array([0, 1, 5]),
          "classes": np.array(["a", "b"])}, r"labels\[2\] = 5 is not a class index"),
        ({"images": np.zeros((3, 8, 8)), "labels": np.array([0, 1])}, "3 images but there are 2"),
        ({"images": np.zeros((2, 8, 8)), "labels": np.zeros((2, 3))}, "multi-label"),
        ({"pixels": np.zeros((2, 8, 8))}, "expected keys"),
        ({"images": np.zeros((2, 5, 8, 8)), "labels": np.zeros(2, int)}, "must be"),
        ({"images": np.zeros((2, 8, 8)), "labels": np.array(["x", "y"]),
          "classes": np.array(["x"])}, r"labels \['y'\] are not in the class list"),
    ],
)
def test_bad_npz_gets_clear_error(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        read_npz(path, split=None)
    assert info.value.file == str(path)


def test_pickled_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, images=np.array([{"a": 1}], dtype=object), labels=np.array([0]))
    with pytest.raises(DataError, match="pickled"):
        read_npz(path, split=None)


def test_truncated_npz(tmp_path: Path, bccd_npz: Path) -> None:
    path = tmp_path / "cut.npz"
    path.write_bytes(bccd_npz.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        read_npz(path, split=None)
