"""Few-shot episodes: N-way K-shot Q-query tasks, and the DP-valid sampling mode.

Two samplers:

- :func:`sample_episode` draws a classic episode (disjoint support and query sets) for
  adaptation, evaluation and non-private metric learning.
- :class:`PoissonEpisodeSampler` is the sampler used under DP-SGD. Each step it picks
  ``ways`` classes uniformly from the site's *class list* — a choice that does not
  look at any record — and then includes every record of those classes independently
  with probability ``sample_rate`` (Poisson sampling). Conditional on its class being
  drawn, a record is included with probability exactly ``sample_rate``; otherwise with
  probability 0. So a record's inclusion probability is at most ``sample_rate``, which
  is the rate the accountant is given (the class draw only adds privacy
  amplification, which we do not claim). The class list is treated as public: it is
  the site's label schema, fixed in its configuration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medmeta_common.errors import DataError


@dataclass(frozen=True)
class Episode:
    """One few-shot task: positions of support and query records of ``classes``.

    ``support`` and ``query`` are ordered class by class; the episode label of a
    record is the position of its class in ``classes``.
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    support_labels: np.ndarray
    query_labels: np.ndarray


def classes_with_at_least(labels: np.ndarray, n_classes: int, count: int) -> np.ndarray:
    """Class indices that have ``count`` or more records."""
    return np.flatnonzero(np.bincount(labels, minlength=n_classes) >= count)


def sample_episode(
    labels: np.ndarray,
    *,
    ways: int,
    shots: int,
    queries: int,
    rng: np.random.Generator,
    n_classes: int | None = None,
) -> Episode:
    """Draw an N-way K-shot episode with Q queries per class, support and query disjoint.

    Classes are drawn uniformly among those with at least ``shots + queries`` records.

    Raises
    ------
    DataError
        When fewer than ``ways`` classes have enough records.

    """
    labels = np.asarray(labels)
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    eligible = classes_with_at_least(labels, n_classes, shots + queries)
    if len(eligible) < ways:
        raise DataError(
            "episode",
            f"{ways}-way {shots}-shot episodes with {queries} queries need {ways} classes with "
            f"at least {shots + queries} images each; only {len(eligible)} class(es) have that "
            "many. Lower --ways, --shots or --queries, or add images.",
        )
    chosen = rng.choice(eligible, size=ways, replace=False)
    support, query = [], []
    for cls in chosen:
        members = rng.permutation(np.flatnonzero(labels == cls))
        support.append(members[:shots])
        query.append(members[shots : shots + queries])
    return Episode(
        classes=chosen,
        support=np.concatenate(support),
        query=np.concatenate(query),
        support_labels=np.repeat(np.arange(ways), shots),
        query_labels=np.repeat(np.arange(ways), queries),
    )


class PoissonEpisodeSampler:
    """DP-valid episode sampler: data-independent class draw, then Poisson sampling.

    Parameters
    ----------
    labels : np.ndarray
        Class index of every training record of the site.
    n_classes : int
        Size of the site's class list (its label schema).
    ways : int
        Classes drawn per step; ``ways == n_classes`` is plain Poisson sampling.
    sample_rate : float
        Probability that a record of a drawn class is in the step's batch. This is the
        rate the privacy accountant must be given.
    rng : np.random.Generator
        Source of randomness (seed it for reproducible runs; use fresh entropy in
        production so the sampling stays secret).
    groups : np.ndarray, optional
        Patient (or other unit) of each record. When given, Poisson sampling is over
        *patients*: each patient is in a step with probability ``sample_rate``, and
        with them all their records of the drawn classes (patient-level privacy).

    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        n_classes: int,
        ways: int,
        sample_rate: float,
        rng: np.random.Generator,
        groups: np.ndarray | None = None,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 1 <= ways <= n_classes:
            raise ValueError(f"ways must be in [1, {n_classes}], got {ways}")
        self.labels = np.asarray(labels)
        self.n_classes = n_classes
        self.ways = ways
        self.sample_rate = sample_rate
        self.rng = rng
        self._members = [np.flatnonzero(self.labels == c) for c in range(n_classes)]
        self.units: np.ndarray | None = None
        if groups is not None:
            _, self.units = np.unique(np.asarray(groups), return_inverse=True)
        self.n_units = len(self.labels) if self.units is None else int(self.units.max()) + 1

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One step: the drawn classes and the positions of the included records.

        The batch may be empty; DP-SGD must still take the (noise-only) step.
        """
        classes = np.sort(self.rng.choice(self.n_classes, size=self.ways, replace=False))
        candidates = np.concatenate([self._members[c] for c in classes])
        if self.units is None:
            keep = self.rng.random(len(candidates)) < self.sample_rate
        else:  # one coin per patient, shared by all of that patient's records
            drawn = self.rng.random(self.n_units) < self.sample_rate
            keep = drawn[self.units[candidates]]
        return classes, np.sort(candidates[keep])

    def expected_batch_size(self) -> float:
        """Mean number of privacy units per step: ``sample_rate * ways / n_classes * N``.

        ``N`` counts records, or patients under patient-level sampling (then an upper
        bound: a patient without records of the drawn classes contributes nothing).
        """
        return self.sample_rate * self.ways / self.n_classes * self.n_units
