"""Few-shot episodes: N-way K-shot Q-query tasks with disjoint support and query sets.

:func:`sample_episode` draws a classic episode for adaptation, evaluation and
non-private metric learning. Training under DP draws its batches with the Poisson
sampler of :mod:`medmeta_common.privacy.sampling` instead.
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
