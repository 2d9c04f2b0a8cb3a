"""Aggregation of site encoders: pure functions on arrays, checkable by hand."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``sum_i w_i * state_i / sum_i w_i``, array by array (float64 accumulation).

    Raises
    ------
    ValueError
        With no states, or weights that are negative or sum to zero.

    """
    if not states:
        raise ValueError("nothing to aggregate")
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
