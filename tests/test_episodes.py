"""Few-shot episodes, and the DP-valid Poisson sampler's inclusion rate."""

from __future__ import annotations

import numpy as np
import pytest

from medmeta_common.episodes import sample_episode
from medmeta_common.errors import DataError
from medmeta_common.privacy.sampling import PoissonSampler


def test_episode_shape_and_disjoint_support_query() -> None:
    labels = np.repeat(np.arange(6), 20)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ep = sample_episode(labels, ways=3, shots=5, queries=7, rng=rng)
        assert len(ep.support) == 15 and len(ep.query) == 21
        assert not set(ep.support) & set(ep.query)
        np.testing.assert_array_equal(labels[ep.support], np.repeat(ep.classes, 5))
        np.testing.assert_array_equal(labels[ep.query], np.repeat(ep.classes, 7))
        np.testing.assert_array_equal(ep.support_labels, np.repeat(np.arange(3), 5))


def test_episode_only_draws_classes_with_enough_images() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    rng = np.random.default_rng(1)
    drawn = {c for _ in range(40) for c in sample_episode(
        labels, ways=2, shots=2, queries=2, rng=rng).classes}
    assert drawn == {0, 2}


def test_too_few_classes_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="need 3 classes with at least 6 images"):
        sample_episode(np.repeat(np.arange(3), [10, 10, 2]), ways=3, shots=1, queries=5,
                       rng=np.random.default_rng(0))


def test_poisson_inclusion_rate_matches_stated_rate() -> None:
    """Conditional on its class being drawn, each record is included with probability q."""
    labels = np.repeat(np.arange(5), [40, 60, 20, 80, 50])
    q, steps = 0.1, 4000
    sampler = PoissonSampler(len(labels), labels=labels, n_classes=5, ways=2, sample_rate=q,
                             rng=np.random.default_rng(0))
    included = np.zeros(len(labels))
    eligible = np.zeros(len(labels))
    for _ in range(steps):
        draw = sampler.sample()
        classes, batch = draw.classes, draw.index
        eligible[np.isin(labels, classes)] += 1
        included[batch] += 1
        assert np.isin(labels[batch], classes).all()
    pooled = included.sum() / eligible.sum()
    # Binomial standard error of the pooled rate is ~0.0007 here: 5 sigma = 0.0035.
    assert pooled == pytest.approx(q, abs=0.0035)
    per_record = included / eligible
    assert np.abs(per_record - q).max() < 0.06  # each record, ~1600 trials: 6.6 sigma
    # The unconditional rate is q * ways / n_classes, below the rate the accountant uses.
    assert included.sum() / (steps * len(labels)) == pytest.approx(q * 2 / 5, abs=0.002)


def test_classes_are_drawn_uniformly_whatever_the_data() -> None:
    labels = np.repeat(np.arange(4), [1, 1, 1, 500])  # class sizes must not matter
    sampler = PoissonSampler(len(labels), labels=labels, n_classes=4, ways=1, sample_rate=0.5,
                             rng=np.random.default_rng(3))
    counts = np.bincount([sampler.sample().classes[0] for _ in range(4000)],  # type: ignore[index]
                         minlength=4)
    assert np.abs(counts / 4000 - 0.25).max() < 0.03


def test_all_ways_is_plain_poisson_sampling_and_can_be_empty() -> None:
    sampler = PoissonSampler(5, sample_rate=0.05, rng=np.random.default_rng(0))
    sizes = [len(sampler.sample().index) for _ in range(500)]
    assert 0 in sizes  # empty batches happen and must be handled by training
    assert np.mean(sizes) == pytest.approx(sampler.expected_batch_size(), abs=0.1)


def test_sampler_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampler(3, sample_rate=0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="ways"):
        PoissonSampler(3, labels=np.zeros(3, int), n_classes=1, ways=2, sample_rate=0.1,
                       rng=np.random.default_rng(0))
