"""Aggregation of site encoders: pure functions on arrays, checkable by hand.

:func:`aggregate` is the one entry point: the Flower strategy
(:mod:`server.strategy`) and the in-process benchmark federation
(:mod:`benchmarks.federation`) both call it, with the ``server.aggregator`` setting.

- ``mean``: the record-weighted mean (FedAvg; McMahan et al. 2017).
- ``trimmed_mean``: per coordinate, drop the ``trim_fraction`` largest and smallest
  values and average the rest (Yin et al. 2018, "Byzantine-robust distributed learning:
  towards optimal statistical rates").
- ``median``: the coordinate-wise median (Yin et al. 2018).
- ``multikrum``: keep the ``n - f`` updates closest to their neighbours, then take
  their weighted mean (Blanchard et al. 2017, "Machine learning with adversaries:
  Byzantine tolerant gradient descent"; El Mhamdi et al. 2018, "The hidden
  vulnerability of distributed learning in Byzantium").

The robust rules ignore the record counts: a site reports its own count, so a hostile
site could claim a million records and outweigh everyone. Multi-Krum weights only the
updates it kept. All four are translation-equivariant, so aggregating encoders equals
aggregating updates (encoder minus global encoder) and adding the global encoder back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from medmeta_common.config import MetaUpdateConfig
from medmeta_common.privacy.central_dp import noisy_mean_update

State = Mapping[str, np.ndarray]

AGGREGATORS = ("mean", "trimmed_mean", "median", "multikrum")


def _check_states(states: Sequence[State]) -> None:
    if not states:
        raise ValueError("nothing to aggregate")


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``sum_i w_i * state_i / sum_i w_i``, array by array (float64 accumulation).

    Raises
    ------
    ValueError
        With no states, or weights that are negative or sum to zero.

    """
    _check_states(states)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(states),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be one non-negative number per state, not all zero: "
                         f"{list(weights)}")
    w = w / w.sum()
    return {
        key: np.sum([wi * np.asarray(s[key], dtype=np.float64) for wi, s in zip(w, states,
                                                                                strict=True)],
                    axis=0).astype(np.asarray(states[0][key]).dtype)
        for key in states[0]
    }


def _coordinatewise(states: Sequence[State],
                    reduce: Callable[[np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """``reduce`` over axis 0 of every stacked array (in float64, cast back)."""
    _check_states(states)
    out = {}
    for key in states[0]:
        stacked = np.stack([np.asarray(s[key], dtype=np.float64) for s in states])
        out[key] = np.asarray(reduce(stacked)).astype(np.asarray(states[0][key]).dtype)
    return out


def trimmed_mean(states: Sequence[State], trim_fraction: float) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean: cut ``int(trim_fraction * n)`` values at each end.

    Uses Flower's ``trim_mean`` (the FedTrimmedAvg rule). With ``n`` states fewer than
    ``1 / trim_fraction``, nothing is cut and this is the plain mean.

    Raises
    ------
    ValueError
        With no states, or ``trim_fraction`` outside ``[0, 0.5)``.

    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), not {trim_fraction}")
    return _coordinatewise(states, lambda stacked: trim_mean(stacked, trim_fraction))


def coordinate_median(states: Sequence[State]) -> dict[str, np.ndarray]:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    return _coordinatewise(states, lambda stacked: np.median(stacked, axis=0))


def pairwise_sq_distances(states: Sequence[State]) -> np.ndarray:
    """``(n, n)`` squared L2 distances between whole states, in float64.

    Flower's ``multikrum.compute_distances`` does the same on ArrayRecords, but in the
    arrays' own dtype (float32 here) and on uncentred vectors: ``|x|^2 + |y|^2 - 2 x.y``
    then cancels catastrophically, because encoders are far from the origin and close
    to each other. We centre the flat vectors first and accumulate in float64.
    """
    _check_states(states)
    keys = list(states[0])
    flat = np.stack([np.concatenate([np.asarray(s[k], dtype=np.float64).ravel() for k in keys])
                     for s in states])
    flat -= flat.mean(axis=0)
    norms = np.einsum("ij,ij->i", flat, flat)
    distances = norms[:, None] + norms[None, :] - 2.0 * flat @ flat.T
    np.fill_diagonal(distances, 0.0)
    return np.asarray(np.maximum(distances, 0.0))


def multikrum_select(distances: np.ndarray, max_faulty: int) -> list[int]:
    """Indices (ascending) that Multi-Krum keeps, from squared distances.

    Each update's score is the sum of its squared distances to its ``n - f - 2``
    nearest other updates (at least 1); the ``n - f`` lowest scores are kept (at least
    one). Same rule as Flower's ``select_multikrum``; ties go to the lower index.
    The guarantee of Blanchard et al. (2017) needs ``n > 2 f + 2``.

    Raises
    ------
    ValueError
        If ``distances`` is not square or ``max_faulty`` is negative.

    """
    n = distances.shape[0]
    if distances.shape != (n, n) or n == 0:
        raise ValueError(f"distances must be a non-empty square matrix, not {distances.shape}")
    if max_faulty < 0:
        raise ValueError(f"max_faulty must be 0 or more, not {max_faulty}")
    if n == 1:
        return [0]
    neighbours = min(n - 1, max(1, n - max_faulty - 2))
    scores = []
    for i in range(n):
        others = np.delete(distances[i], i)
        scores.append(float(np.sort(others)[:neighbours].sum()))
    keep = max(1, n - max_faulty)
    return sorted(np.argsort(scores, kind="stable")[:keep].tolist())


def multikrum(states: Sequence[State], weights: Sequence[float],
              max_faulty: int) -> dict[str, np.ndarray]:
    """Weighted mean of the ``n - f`` states Multi-Krum keeps (see :func:`multikrum_select`)."""
    kept = multikrum_select(pairwise_sq_distances(states), max_faulty)
    return weighted_mean([states[i] for i in kept], [weights[i] for i in kept])


def aggregate(states: Sequence[State], weights: Sequence[float], *, method: str,
              trim_fraction: float = 0.2, max_faulty: int = 1) -> dict[str, np.ndarray]:
    """Aggregate accepted site encoders with the rule named ``method``.

    Parameters
    ----------
    states : sequence of mapping
        The sites' encoders (same keys and shapes), already checked.
    weights : sequence of float
        Each site's record count; used by ``mean`` and ``multikrum`` only.
    method : {"mean", "trimmed_mean", "median", "multikrum"}
        The rule (``server.aggregator``); see the module docstring.
    trim_fraction : float
        Share cut at each end per coordinate by ``trimmed_mean``.
    max_faulty : int
        ``f``, the number of hostile sites ``multikrum`` is built to withstand.

    Raises
    ------
    ValueError
        For an unknown ``method``, no states, or bad weights or parameters.

    """
    if method == "mean":
        return weighted_mean(states, weights)
    if method == "trimmed_mean":
        return trimmed_mean(states, trim_fraction)
    if method == "median":
        return coordinate_median(states)
    if method == "multikrum":
        return multikrum(states, weights, max_faulty)
    raise ValueError(f"unknown aggregator {method!r}; choose one of {', '.join(AGGREGATORS)}")


def server_target(states: Sequence[State], weights: Sequence[float], current: State,
                  server: MetaUpdateConfig, *, sites_asked: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What the meta-update moves toward this round.

    The chosen aggregate of the sites' encoders, or, with ``server.central_dp``, the
    clipped and noised mean update.
    """
    if server.central_dp is not None:
        return noisy_mean_update(states, current, clip=server.central_dp.clip,
                                 noise_multiplier=server.central_dp.noise_multiplier,
                                 sites_asked=sites_asked, rng=rng)
    return aggregate(states, weights, method=server.aggregator,
                     trim_fraction=server.trim_fraction, max_faulty=server.max_faulty)
