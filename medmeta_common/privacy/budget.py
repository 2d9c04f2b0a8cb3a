"""The budget guard: a site trains a round only if its privacy budget allows it.

For each round the guard, holding the site's ledger lock,

1. calibrates the noise once, so that the planned rounds spend exactly the budget
   (or takes the configured ``noise_multiplier``), and keeps it in the ledger;
2. refuses the round when its steps would take ε above the budget (the site then
   sends no update, only ``refused = 1``);
3. lets the round train, then records its steps in the ledger, on disk, *before*
   the update can leave the site (a crash can only over-count).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medmeta_common.config import PrivacyConfig
from medmeta_common.privacy.accounting import calibrate_noise, default_delta
from medmeta_common.privacy.dp_sgd import DPSettings
from medmeta_common.privacy.ledger import PrivacyLedger, ledger_lock
from medmeta_common.protocol import NUM_EXAMPLES

log = logging.getLogger(__name__)

Metrics = dict[str, float | int]


@dataclass(frozen=True)
class RoundBudget:
    """One round's place in the run, as the guard needs it.

    Attributes
    ----------
    site : str
        The site's name (the ledger belongs to it).
    state_dir : Path
        Where the site's ledger lives.
    privacy : PrivacyConfig
        The site's own budget and mechanism settings.
    server_round : int
        The round's number (recorded in the ledger).
    steps : int
        DP-SGD steps this round.
    planned_steps : int
        Steps of the whole run, for the one-off noise calibration: the planned rounds
        plus the server's spare rounds for retries (``server.spare_rounds``). A round
        that failed at the server and is retried was still trained here and counts.
    units : int
        Privacy units in the site's training data (for the default δ).
    sample_rate : float
        The Poisson rate of the round's steps.

    """

    site: str
    state_dir: Path
    privacy: PrivacyConfig
    server_round: int
    steps: int
    planned_steps: int
    units: int
    sample_rate: float


def guarded_round(budget: RoundBudget, train: Callable[[DPSettings], int],
                  metrics: Metrics) -> bool:
    """Run ``train`` under the site's ledger; ``False`` (metrics say so) if over budget.

    ``train`` gets the DP settings and returns the steps it took; ``metrics`` receives
    what the round may release about its privacy (ε, δ, steps, noise, rate).
    """
    privacy, rate = budget.privacy, budget.sample_rate
    delta = privacy.delta or default_delta(budget.units)
    with ledger_lock(budget.state_dir):
        ledger = PrivacyLedger.open(budget.state_dir, site=budget.site, delta=delta,
                                    epsilon_budget=privacy.epsilon, unit=privacy.unit,
                                    accountant=privacy.accountant)
        sigma = privacy.noise_multiplier or ledger.calibrated_noise
        if sigma is None:
            sigma = calibrate_noise(epsilon=privacy.epsilon, delta=delta, sample_rate=rate,
                                    steps=budget.planned_steps, accountant=privacy.accountant)
            ledger.calibrated_noise = sigma
            ledger.save()
        metrics.update({"dp": 1, "delta": delta, "noise-multiplier": sigma, "sample-rate": rate,
                        "epsilon-budget": privacy.epsilon})
        after = ledger.epsilon_after(sigma, rate, budget.steps)
        if after > privacy.epsilon:
            log.warning("site %s: refusing round %d: epsilon would reach %.3f, above the "
                        "budget %.3f", budget.site, budget.server_round, after, privacy.epsilon)
            metrics.update({NUM_EXAMPLES: 0, "refused": 1, "epsilon": ledger.epsilon,
                            "steps": ledger.steps})
            return False
        taken = train(DPSettings(sigma, rate, privacy.max_grad_norm, privacy.unit))
        # The spend is on disk before the update leaves the site.
        epsilon = ledger.record(budget.server_round, sigma, rate, taken, privacy.max_grad_norm)
        metrics.update({"epsilon": epsilon, "steps": ledger.steps, "round-steps": taken})
    return True
