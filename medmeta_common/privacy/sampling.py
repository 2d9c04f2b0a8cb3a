"""How a site's training steps draw their records: the one Poisson sampler, and its rate.

Under DP-SGD every step's batch is drawn by :class:`PoissonSampler`. Optionally it
first picks ``ways`` classes uniformly from the site's *class list* — a choice that
looks at no record — and then includes every privacy unit (a record, or a patient
with all their records) independently with probability ``sample_rate``. Conditional
on its class being drawn a unit is included with probability exactly
``sample_rate``, otherwise with probability 0, so a unit's inclusion probability is
at most ``sample_rate``: the rate the accountant is given (the class draw only adds
amplification, which we do not claim). The class list is the site's label schema,
fixed in its configuration, and treated as public.

The privacy unit is what the accountant protects: a record (an image; for a task
whose record spans several training rows, such as the slices of one volume, the task
names that record as its unit) or a patient. Units are sampled whole: all their rows
of the drawn classes come together, and the DP step clips their summed gradient as
one contribution (:mod:`medmeta_common.privacy.dp_sgd`).

:class:`FixedBatchSampler` draws a fixed number of records per step without
replacement; fixed-size batches are *not* what the accountant assumes, so it is only
for non-private training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Draw:
    """One step's records: positions into the training data, and the classes drawn."""

    index: np.ndarray
    classes: np.ndarray | None = None


class Sampler(Protocol):
    """Draws the records of each training step."""

    def sample(self) -> Draw:
        """The next step's records."""


def poisson_rate(batch_size: int, n_records: int, *, ways: int | None = None,
                 n_classes: int = 1) -> float:
    """The rate that gives ``batch_size`` expected records per step (capped at 1).

    With a class draw, only the records of ``ways`` of ``n_classes`` classes are
    candidates in a step.
    """
    pool = n_records * min(ways or n_classes, n_classes) / n_classes
    return float(min(1.0, batch_size / max(pool, 1.0)))


class PoissonSampler:
    """DP-valid sampler: a data-independent class draw (optional), then Poisson sampling.

    Parameters
    ----------
    n_records : int
        Training records (rows) of the site.
    sample_rate : float
        Probability that a unit (of a drawn class) is in a step's batch: the rate the
        privacy accountant must be given.
    rng : np.random.Generator
        Source of randomness: fresh OS entropy under DP, so the sampling stays secret.
    labels : np.ndarray, optional
        Class index of every record, for the class draw; ``None`` draws no classes.
    n_classes : int
        Size of the site's class list (its label schema).
    ways : int, optional
        Classes drawn per step (``None`` or ``n_classes``: every class).
    units : np.ndarray, optional
        The privacy unit of every record (patient, or source volume); ``None``: each
        record is its own unit.

    """

    def __init__(self, n_records: int, *, sample_rate: float, rng: np.random.Generator,
                 labels: np.ndarray | None = None, n_classes: int = 1,
                 ways: int | None = None, units: np.ndarray | None = None) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.labels = np.zeros(n_records, np.int64) if labels is None else np.asarray(labels)
        self.draws_classes = labels is not None
        self.n_classes = n_classes if labels is not None else 1
        self.ways = ways or self.n_classes
        if not 1 <= self.ways <= self.n_classes:
            raise ValueError(f"ways must be in [1, {self.n_classes}], got {ways}")
        self.sample_rate = sample_rate
        self.rng = rng
        self._members = [np.flatnonzero(self.labels == c) for c in range(self.n_classes)]
        self.unit_of_record: np.ndarray | None = None
        if units is not None:
            _, self.unit_of_record = np.unique(np.asarray(units), return_inverse=True)
        self.n_units = n_records if self.unit_of_record is None else \
            int(self.unit_of_record.max(initial=-1)) + 1

    def sample(self) -> Draw:
        """One step: the drawn classes and the positions of the included records.

        The batch may be empty; DP-SGD must still take the (noise-only) step.
        """
        classes = np.sort(self.rng.choice(self.n_classes, size=self.ways, replace=False))
        candidates = np.concatenate([self._members[c] for c in classes])
        if self.unit_of_record is None:
            keep = self.rng.random(len(candidates)) < self.sample_rate
        else:  # one coin per unit, shared by all of that unit's records
            drawn = self.rng.random(self.n_units) < self.sample_rate
            keep = drawn[self.unit_of_record[candidates]]
        return Draw(np.sort(candidates[keep]), classes if self.draws_classes else None)

    def units_of(self, index: np.ndarray) -> np.ndarray | None:
        """Compact unit ids ``0..u-1`` of the records at ``index`` (``None``: one each)."""
        if self.unit_of_record is None:
            return None
        _, compact = np.unique(self.unit_of_record[index], return_inverse=True)
        return compact

    def expected_batch_size(self) -> float:
        """Mean number of units per step: ``sample_rate * ways / n_classes * units``.

        Under unit sampling an upper bound: a unit without records of the drawn
        classes contributes nothing.
        """
        return self.sample_rate * self.ways / self.n_classes * self.n_units


class FixedBatchSampler:
    """``batch_size`` records per step drawn without replacement (all, if fewer).

    Not DP-valid (the accountant assumes Poisson sampling): non-private training only.
    """

    def __init__(self, n_records: int, batch_size: int, rng: np.random.Generator) -> None:
        self.n_records = n_records
        self.batch_size = batch_size
        self.rng = rng

    def sample(self) -> Draw:
        """The next step's records."""
        return Draw(self.rng.permutation(self.n_records)[:self.batch_size])
