"""Hostile and broken site updates, for :func:`benchmarks.federation.run_inprocess`.

Each attack maps ``(global encoder, honest site encoder)`` to what a hostile site
sends; :func:`tamper_with` turns one into the ``tamper`` hook for chosen sites.

- ``sign_flip``: ``theta - k (theta_i - theta)``, the honest update reversed and
  boosted (the "sign-flipping" attack of Damaskinos et al. 2018 / Allen-Zhu et al.
  2021; ``k = 4`` here).
- ``scale``: ``theta + 100 (theta_i - theta)``, a boosted update (Bagdasaryan et al.
  2020, "How to backdoor federated learning").
- ``nan``: every value NaN, as a broken site (a diverged optimiser) would send.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from benchmarks.federation import Tamper

Attack = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], dict[str, np.ndarray]]

SIGN_FLIP_BOOST = 4.0
SCALE_FACTOR = 100.0


def _along_update(factor: float) -> Attack:
    def attack(current: Mapping[str, np.ndarray],
               site: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (current[k] + factor * (site[k] - current[k])).astype(site[k].dtype)
                for k in site}
    return attack


def nan_update(current: Mapping[str, np.ndarray],
               site: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every value NaN (shapes and dtypes kept)."""
    return {k: np.full_like(v, np.nan) for k, v in site.items()}


ATTACKS: dict[str, Attack] = {
    "sign_flip": _along_update(-SIGN_FLIP_BOOST),
    "scale": _along_update(SCALE_FACTOR),
    "nan": nan_update,
}


def tamper_with(assignments: Mapping[str, str]) -> Tamper:
    """The ``tamper`` hook: each site named in ``assignments`` sends its attack's output.

    ``assignments`` maps a site name to an attack name of :data:`ATTACKS`; other sites
    send their honest encoders.

    Raises
    ------
    KeyError
        For an unknown attack name.

    """
    unknown = sorted(set(assignments.values()) - set(ATTACKS))
    if unknown:
        raise KeyError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    chosen = {site: ATTACKS[attack] for site, attack in assignments.items()}

    def tamper(name: str, round_number: int, current: Mapping[str, np.ndarray],
               site: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return chosen[name](current, site) if name in chosen else site

    return tamper
