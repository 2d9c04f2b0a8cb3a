"""Deterministic splits that never cut a patient (or other group) in two."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def assign_groups(
    groups: Sequence[str] | np.ndarray, weights: Sequence[float], seed: int
) -> np.ndarray:
    """Give every record a bucket index so that each group lands in exactly one bucket.

    Groups are shuffled with ``seed`` and dealt out in order by their share of the
    *records*; each bucket with a positive weight gets at least one group when there
    are enough groups.

    Parameters
    ----------
    groups : sequence of str
        The group (patient) key of each record.
    weights : sequence of float
        Relative size of each bucket (need not sum to one).
    seed : int
        Seed of the shuffle; the same inputs and seed always give the same answer.

    Returns
    -------
    np.ndarray
        ``(N,)`` int bucket index per record.

    """
    keys = np.asarray(groups).astype(str)
    unique, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"bucket weights must be non-negative and not all zero, got {weights}")
    order = np.random.default_rng(seed).permutation(len(unique))
    # A group goes to the bucket its midpoint (in shuffled record order) falls into.
    cuts = np.cumsum(w / w.sum()) * counts.sum()
    midpoints = np.cumsum(counts[order]) - counts[order] / 2
    bucket_of_group = np.empty(len(unique), dtype=np.int64)
    bucket_of_group[order] = np.minimum(np.searchsorted(cuts, midpoints, side="right"), len(w) - 1)
    # Small sites: give an empty bucket (with positive weight) a group from the fullest one.
    for bucket in np.flatnonzero(w > 0):
        sizes = np.bincount(bucket_of_group, minlength=len(w))
        donor = int(np.argmax(sizes))
        if sizes[bucket] == 0 and sizes[donor] > 1:
            last_of_donor = [g for g in order if bucket_of_group[g] == donor][-1]
            bucket_of_group[last_of_donor] = bucket
    return bucket_of_group[inverse]


def split_by_group(
    groups: Sequence[str] | np.ndarray,
    seed: int,
    fractions: dict[str, float] | None = None,
) -> np.ndarray:
    """Name a split (``train``/``val``/``test`` by default) for each record, per group."""
    fractions = fractions or DEFAULT_FRACTIONS
    names = np.array(list(fractions))
    return names[assign_groups(groups, list(fractions.values()), seed)]


def partition_by_group(
    groups: Sequence[str] | np.ndarray, parts: int, index: int, seed: int
) -> np.ndarray:
    """Positions of the records in part ``index`` of ``parts`` equal, group-disjoint parts."""
    buckets = assign_groups(groups, [1.0] * parts, seed)
    return np.flatnonzero(buckets == index)


def train_val_split(data: Any, groups: Sequence[str] | np.ndarray, val_fraction: float,
                    seed: int) -> tuple[Any, Any]:
    """``data`` (anything with ``subset``) split into training and validation by group."""
    bucket = assign_groups(groups, [1 - val_fraction, val_fraction], seed)
    return data.subset(np.flatnonzero(bucket == 0)), data.subset(np.flatnonzero(bucket == 1))
