"""Central (site-level) differential privacy at the server.

An option on top of the sites' own record-level DP, never a replacement.

Each round, every site's update ``u_i = theta_i - theta`` is clipped to L2 norm at
most ``clip``; the server adds Gaussian noise of standard deviation
``noise_multiplier * clip`` to the *sum* of the clipped updates and divides by the
number of sites it asked (a fixed denominator, so that a site's presence changes the
sum by at most ``clip``), as in DP-FedAvg (McMahan et al. 2018, "Learning
differentially private recurrent language models"). The protected unit is a whole
site. Accounting: the Gaussian mechanism composed over the rounds in Rényi DP, with
*no* amplification from site sampling claimed (sampling rate 1), converted as the
record-level ε is. Flower's own server-side DP wrappers compute no ε, which is why
this is ours.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medmeta_common.privacy.accounting import epsilon_of

State = Mapping[str, np.ndarray]


def clip_update(state: State, current: State, clip: float) -> dict[str, np.ndarray]:
    """``state - current`` scaled down to L2 norm at most ``clip`` (all arrays together)."""
    update = {k: np.asarray(state[k], dtype=np.float64) - current[k] for k in current}
    norm = float(np.sqrt(sum(np.sum(u**2) for u in update.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: u * scale for k, u in update.items()}


def noisy_mean_update(states: Sequence[State], current: State, *, clip: float,
                      noise_multiplier: float, sites_asked: int,
                      rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The new aggregate target: ``current + (sum_i clip(u_i) + N(0, (z S)^2)) / sites_asked``."""
    if sites_asked < max(1, len(states)):
        raise ValueError(f"{len(states)} updates from {sites_asked} sites asked")
    total = {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in current.items()}
    for state in states:
        for k, u in clip_update(state, current, clip).items():
            total[k] += u
    sd = noise_multiplier * clip
    return {k: (current[k] + (total[k] + rng.normal(0.0, sd, size=total[k].shape))
                / sites_asked).astype(np.asarray(current[k]).dtype)
            for k in current}


def central_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Site-level ε after ``rounds`` noisy aggregates (sampling rate 1: no amplification)."""
    return epsilon_of([(noise_multiplier, 1.0, rounds)], delta) if rounds else 0.0
