"""Central (site-level) DP: clipping bounds a site, the noise has its scale, ε is exact."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medmeta_common.config import CentralDPConfig, MetaUpdateConfig
from medmeta_common.config.typed import build
from medmeta_common.errors import ConfigError
from medmeta_common.privacy.central_dp import central_epsilon, clip_update, noisy_mean_update
from server.aggregation import server_target


def state(value: float, size: int = 1000) -> dict[str, np.ndarray]:
    return {"w": np.full(size, value, dtype=np.float32)}


def test_clip_scales_the_whole_update_to_the_bound() -> None:
    current = {"a": np.zeros(3), "b": np.zeros(4)}
    clipped = clip_update({"a": np.full(3, 3.0), "b": np.full(4, 4.0)}, current, clip=1.0)
    norm = math.sqrt(sum(float(np.sum(u**2)) for u in clipped.values()))
    assert norm == pytest.approx(1.0)
    small = clip_update({"a": np.full(3, 0.1), "b": np.zeros(4)}, current, clip=1.0)
    np.testing.assert_allclose(small["a"], 0.1)  # within the bound: unchanged


def test_one_site_moves_the_aggregate_by_at_most_clip_over_sites_asked() -> None:
    current = state(0.0)
    honest = [state(0.01), state(0.01)]
    rng = np.random.default_rng(0)
    without = noisy_mean_update(honest, current, clip=0.5, noise_multiplier=1e-12,
                                sites_asked=3, rng=rng)
    with_hostile = noisy_mean_update([*honest, state(1e6)], current, clip=0.5,
                                     noise_multiplier=1e-12, sites_asked=3, rng=rng)
    shift = float(np.linalg.norm(with_hostile["w"].astype(np.float64) - without["w"]))
    assert shift <= 0.5 / 3 + 1e-6


def test_noise_has_the_stated_scale() -> None:
    current = state(0.0, size=200_000)
    out = noisy_mean_update([current, current], current, clip=0.3, noise_multiplier=2.0,
                            sites_asked=4, rng=np.random.default_rng(1))
    assert float(out["w"].std()) == pytest.approx(2.0 * 0.3 / 4, rel=0.01)


def test_site_level_epsilon_matches_the_gaussian_closed_form() -> None:
    # Gaussian mechanism, sensitivity 1 in units of clip: RDP(a) = a / (2 z^2) per round.
    z, rounds, delta = 4.0, 30, 1e-3
    orders = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(11, 1025)])
    rdp = rounds * orders / (2 * z**2)
    balle = np.min(rdp - (math.log(delta) + np.log(orders)) / (orders - 1)
                   + np.log((orders - 1) / orders))
    assert central_epsilon(z, rounds, delta) == pytest.approx(balle, rel=0.02)
    assert central_epsilon(z, 0, delta) == 0.0
    assert central_epsilon(z, 60, delta) > central_epsilon(z, 30, delta)


def test_server_target_switches_on_central_dp() -> None:
    current = state(0.0, size=10)
    plain = build(MetaUpdateConfig, {}, source="test")
    private = build(MetaUpdateConfig, {"central_dp": {"clip": 1.0, "noise_multiplier": 1.0}},
                    source="test")
    states, weights = [state(1.0, 10), state(3.0, 10)], [1.0, 1.0]
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(server_target(states, weights, current, plain, sites_asked=2,
                                             rng=rng)["w"], 2.0)
    noisy = server_target(states, weights, current, private, sites_asked=2, rng=rng)["w"]
    assert not np.allclose(noisy, 2.0)  # clipped to norm 1 each, and noised


def test_central_dp_needs_the_plain_mean() -> None:
    with pytest.raises(ConfigError, match="aggregator 'mean'"):
        build(MetaUpdateConfig, {"aggregator": "median",
                                 "central_dp": {"clip": 1.0, "noise_multiplier": 1.0}},
              source="server.yaml", field="server")
    with pytest.raises(ConfigError, match="noise_multiplier"):
        build(CentralDPConfig, {"clip": 1.0, "noise_multiplier": 0}, source="x")
