"""Privacy accounting for DP-SGD with Poisson sampling (Opacus accountants).

We account with Opacus' RDP accountant: Rényi DP of the sampled Gaussian mechanism
(Mironov 2017; Mironov, Talwar & Zhang 2019), composed over steps, then converted to
(ε, δ)-DP with the conversion of Balle et al. 2020 ("Hypothesis testing
interpretations and Rényi differential privacy", Thm. 21) — Opacus' ``rdp``
``get_epsilon``. The history is a list of ``(noise_multiplier, sample_rate, steps)``
entries, which is all an accountant needs and all the ledger stores.
"""

from __future__ import annotations

from collections.abc import Sequence

ACCOUNTANT = "rdp"
CONVERSION = "RDP (sampled Gaussian) -> (epsilon, delta) by Balle et al. 2020, Thm. 21"

HistoryEntry = tuple[float, float, int]

# Rényi orders searched for the tightest conversion: Opacus' defaults (1.1 ... 63)
# plus larger orders, which are optimal for short runs (few steps, little noise).
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [
    64, 80, 96, 128, 160, 192, 256, 384, 512, 1024]


def epsilon_of(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε spent after the steps in ``history`` at ``delta`` (0 for an empty history)."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant  # Opacus costs ~1.2 s to import

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(accountant.get_epsilon(delta=delta, alphas=ALPHAS))


def calibrate_noise(*, epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (to 0.01 in ε) whose ``steps`` spend at most ``epsilon``.

    Opacus' binary search returns the upper end of its bracket, so the result never
    overshoots the target ε.
    """
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=ACCOUNTANT,
            epsilon_tolerance=0.01,
            alphas=ALPHAS,
        )
    )


def default_delta(n_records: int) -> float:
    """δ well below 1/N: ``min(1e-5, 1 / (10 N))``."""
    return min(1e-5, 1.0 / (10 * max(n_records, 1)))
