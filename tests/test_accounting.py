"""Accounting we can check: pinned values, an independent RDP oracle, calibration bounds,
the sampling rate the accountant sees, and the noise Opacus actually adds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp

from medmeta_common.privacy import grad_samplers  # noqa: F401 - our per-sample rules
from medmeta_common.privacy.accounting import ALPHAS, calibrate_noise, epsilon_of
from medmeta_common.privacy.dp_sgd import DPSettings, make_private


def rdp_sampled_gaussian_integer(q: float, sigma: float, alpha: int) -> float:
    """RDP of one step of the Poisson-sampled Gaussian at integer order ``alpha``.

    The closed form of Mironov, Talwar & Zhang (2019), Eq. (4) / Thm. 9:
    A = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)),
    RDP = log(A) / (alpha - 1). Written independently of Opacus, in log space.
    """
    if q == 1.0:  # no subsampling: the Gaussian mechanism itself
        return alpha / (2 * sigma**2)
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
             + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
             for k in range(alpha + 1)]
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (alpha - 1)


def epsilon_classic(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Mironov (2017), Prop. 3: eps = min_a rdp(a) + log(1/delta) / (a - 1)."""
    return float(np.min(rdp + math.log(1 / delta) / (orders - 1)))


def epsilon_balle(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Balle et al. (2020), Thm. 21 — the conversion medmeta reports."""
    eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.min(eps))


@pytest.mark.parametrize(("q", "sigma"), [(0.04, 1.5), (0.01, 0.8), (0.2, 2.0), (1.0, 5.0)])
def test_opacus_rdp_matches_the_independent_closed_form(q: float, sigma: float) -> None:
    for alpha in (2, 3, 5, 8, 16, 32):
        ours = rdp_sampled_gaussian_integer(q, sigma, alpha)
        theirs = float(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0])
        assert theirs == pytest.approx(ours, rel=1e-6)


def test_reference_point_and_both_conversions() -> None:
    """TF-Privacy/Opacus reference: sigma 1.5, q 0.04, 2250 steps, delta 1e-5."""
    orders = np.arange(2, 257)
    rdp = 2250 * np.array([rdp_sampled_gaussian_integer(0.04, 1.5, a) for a in orders])
    reported = epsilon_of([(1.5, 0.04, 2250)], 1e-5)
    assert reported == pytest.approx(7.329, abs=0.005)  # Balle et al. 2020 conversion
    assert epsilon_balle(rdp, orders, 1e-5) == pytest.approx(reported, abs=0.02)
    classic = epsilon_classic(rdp, orders, 1e-5)
    assert classic == pytest.approx(8.07, abs=0.02)  # the classic conversion is looser
    assert classic > reported


def test_the_prv_accountant_is_nearly_tight_at_the_reference_point() -> None:
    """The same point by the PRV accountant (its upper bound, eps_error 0.01): 6.779, where
    the exact PLD value (Google's dp-accounting) is 6.769 and RDP/Balle gives 7.329."""
    prv = epsilon_of([(1.5, 0.04, 2250)], 1e-5, "prv")
    assert prv == pytest.approx(6.779, abs=0.005)
    assert 6.769 <= prv < epsilon_of([(1.5, 0.04, 2250)], 1e-5, "rdp")  # never below the tight


def test_prv_calibration_buys_less_noise_and_never_overshoots() -> None:
    for q, steps in ((0.1, 100), (0.02, 600), (0.3, 30)):
        sigma = {a: calibrate_noise(epsilon=8.0, delta=1e-5, sample_rate=q, steps=steps,
                                    accountant=a) for a in ("prv", "rdp")}
        assert sigma["prv"] < sigma["rdp"]
        spent = epsilon_of([(sigma["prv"], q, steps)], 1e-5, "prv")
        assert 8.0 - 0.05 <= spent <= 8.0 + 1e-9


def test_composition_is_additive_in_rdp() -> None:
    split = epsilon_of([(1.1, 0.05, 300), (1.1, 0.05, 700)], 1e-5)
    assert split == pytest.approx(epsilon_of([(1.1, 0.05, 1000)], 1e-5), rel=1e-9)


def test_calibrated_noise_never_overshoots() -> None:
    rng = np.random.default_rng(0)
    for _ in range(25):
        target = float(rng.uniform(0.5, 10))
        q = float(10 ** rng.uniform(-3, -0.3))
        steps = int(rng.integers(10, 3000))
        delta = float(10 ** rng.uniform(-7, -5))
        sigma = calibrate_noise(epsilon=target, delta=delta, sample_rate=q, steps=steps)
        spent = epsilon_of([(sigma, q, steps)], delta)
        assert spent <= target + 1e-9, (target, q, steps, delta, sigma, spent)
        assert spent >= target - 0.05  # within the search tolerance: not needlessly noisy


def test_orders_cover_short_runs() -> None:
    # A short, lightly noised run is optimal at a large order; we search up to 1024.
    assert max(ALPHAS) >= 1024
    assert epsilon_of([(1.0, 0.05, 6)], 1e-5) < 2.5


def test_added_noise_has_the_stated_scale_and_is_unpredictable() -> None:
    """Our DP wiring (make_private): with zero gradients the step is pure noise of
    sd = sigma * C / E[B], drawn from OS entropy (two runs never agree)."""
    sigma, clip, expected = 1.3, 0.7, 32.0
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Linear(1000, 200)
        gsm, optimizer = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                      DPSettings(sigma, 0.1, clip), expected,
                                      torch.device("cpu"))
        (gsm(torch.randn(16, 1000)) * 0).sum().backward()
        optimizer.pre_step()
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]))  # 200,200
        gsm.to_standard_module()
    for sample in draws:
        assert float(sample.mean()) == pytest.approx(0, abs=0.002)
        assert float(sample.std()) == pytest.approx(sigma * clip / expected, rel=0.01)
    assert not torch.equal(draws[0], draws[1])


def test_every_parameter_is_clipped_including_scalars() -> None:
    """Under our DP wiring, per-sample gradients exist for every trainable tensor (a 0-d
    one too), and the clipped per-record contributions never exceed the bound."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 3)
            self.temperature = torch.nn.Parameter(torch.tensor(2.0))  # 0-d

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.temperature

    torch.manual_seed(0)
    model = Scaled()
    gsm, optimizer = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                  DPSettings(0.0, 1.0, 0.1), 1.0, torch.device("cpu"))
    # Five copies of one record labelled with its least likely class: five equal, large
    # per-record gradients, so their clipped sum is exactly five times the bound.
    x = (torch.randn(1, 8) * 50).repeat(5, 1)
    with torch.no_grad():
        wrong = model(x).argmin(dim=1)
    torch.nn.functional.cross_entropy(gsm(x), wrong, reduction="sum").backward()
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 5
               for p in model.parameters())
    unclipped = torch.sqrt(sum((p.grad_sample[0] ** 2).sum() for p in model.parameters()))
    assert float(unclipped) > 1.0  # each record's own gradient is far above the bound
    optimizer.pre_step()
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert float(total) == pytest.approx(5 * 0.1, rel=1e-4)
