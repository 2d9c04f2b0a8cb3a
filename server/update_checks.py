"""The server's checks on one site's update, before it can reach the aggregate.

:func:`screen_update` is shared by the Flower strategy (:mod:`server.strategy`) and
the in-process benchmark federation, so both reject exactly the same updates:

1. a malformed encoder (wrong keys, shapes or dtypes, NaN or infinite values):
   :func:`medmeta_common.protocol.check_update`;
2. an update whose L2 norm ``|theta_site - theta|`` exceeds ``server.max_update_norm``
   (off by default). A norm bound caps how far one site can pull the global encoder
   in a round, as the clipping of central DP does for each site's update (McMahan et
   al. 2018, "Learning differentially private recurrent language models"); scaled
   "boosted" updates (Bagdasaryan et al. 2020, "How to backdoor federated learning")
   fail it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from medmeta_common.protocol import check_update

Layout = Mapping[str, tuple[tuple[int, ...], str]]


def update_norm(site: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``site - current`` over all arrays together (float64)."""
    total = 0.0
    for key, value in current.items():
        diff = np.asarray(site[key], dtype=np.float64) - np.asarray(value, dtype=np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def screen_update(site: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray],
                  layout: Layout, *, max_update_norm: float | None) -> str | None:
    """Why the server must reject ``site`` (a site's encoder), or ``None`` to accept it.

    Parameters
    ----------
    site : mapping
        The encoder a site sent back.
    current : mapping
        The global encoder the site started from this round.
    layout : mapping
        Expected ``name -> (shape, dtype)``.
    max_update_norm : float or None
        Largest accepted ``|site - current|``; ``None`` turns the bound off.

    """
    problem = check_update(site, layout)
    if problem is not None or max_update_norm is None:
        return problem
    norm = update_norm(site, current)
    if norm > max_update_norm:
        return (f"update norm {norm:.4g} exceeds server.max_update_norm = "
                f"{max_update_norm:g}")
    return None
