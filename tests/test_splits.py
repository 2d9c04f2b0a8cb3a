"""Splits and partitions never put one patient in two places, and are reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from medmeta_common.data.splits import assign_groups, partition_by_group, split_by_group


def random_groups(seed: int, n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 12, size=n)  # patients with 1..11 images each
    return np.repeat([f"patient-{i}" for i in range(n)], sizes)


@pytest.mark.parametrize("seed", range(5))
def test_no_patient_in_two_splits(seed: int) -> None:
    groups = random_groups(seed)
    splits = split_by_group(groups, seed=seed)
    for name in np.unique(groups):
        assert len(set(splits[groups == name])) == 1, name
    shares = {s: float(np.mean(splits == s)) for s in ("train", "val", "test")}
    assert shares["train"] == pytest.approx(0.7, abs=0.05)
    assert shares["val"] == pytest.approx(0.15, abs=0.05)


def test_same_seed_same_split_other_seed_other_split() -> None:
    groups = random_groups(0)
    np.testing.assert_array_equal(split_by_group(groups, seed=3), split_by_group(groups, seed=3))
    assert (split_by_group(groups, seed=3) != split_by_group(groups, seed=4)).any()


def test_order_of_records_does_not_change_a_patients_split() -> None:
    groups = random_groups(1)
    order = np.random.default_rng(0).permutation(len(groups))
    first = dict(zip(groups, split_by_group(groups, seed=0), strict=True))
    shuffled = dict(zip(groups[order], split_by_group(groups[order], seed=0), strict=True))
    assert first == shuffled


def test_small_site_still_gets_every_split() -> None:
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    assert set(split_by_group(groups, seed=0)) == {"train", "val", "test"}


def test_partitions_are_disjoint_and_complete() -> None:
    groups = random_groups(2)
    parts = [partition_by_group(groups, 4, i, seed=7) for i in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(groups)))
    owners = [set(groups[p]) for p in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not owners[i] & owners[j]


def test_bad_weights_are_refused() -> None:
    with pytest.raises(ValueError, match="weights"):
        assign_groups(["a"], [0, 0], seed=0)
