"""The budget guard: a site trains only while its budget allows, and records before it sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmeta_common.config import PrivacyConfig
from medmeta_common.privacy.accounting import epsilon_of
from medmeta_common.privacy.budget import RoundBudget, guarded_round
from medmeta_common.privacy.dp_sgd import DPSettings
from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger

RATE, STEPS, SIGMA, DELTA = 0.05, 20, 1.0, 1e-5


def budget(state: Path, epsilon: float, round_number: int) -> RoundBudget:
    privacy = PrivacyConfig(epsilon=epsilon, noise_multiplier=SIGMA, delta=DELTA)
    return RoundBudget(site="a", state_dir=state, privacy=privacy, server_round=round_number,
                       steps=STEPS, planned_steps=10 * STEPS, units=1000, sample_rate=RATE)


def test_the_round_that_would_overspend_is_refused_and_nothing_is_recorded(
        tmp_path: Path) -> None:
    one, two = (epsilon_of([(SIGMA, RATE, k * STEPS)], DELTA, "prv") for k in (1, 2))
    limit = (one + two) / 2  # room for one round, not two
    trained: list[DPSettings] = []

    def train(dp: DPSettings) -> int:
        trained.append(dp)
        # The guard records after training returns, so the ledger still says nothing.
        assert not (tmp_path / LEDGER_FILE).exists() or not read_ledger(
            tmp_path / LEDGER_FILE).rounds
        return STEPS

    first: dict[str, float | int] = {}
    assert guarded_round(budget(tmp_path, limit, 1), train, first)
    assert trained == [DPSettings(SIGMA, RATE, 1.0, "image")]
    assert first["epsilon"] == pytest.approx(one) and first["steps"] == STEPS
    ledger = read_ledger(tmp_path / LEDGER_FILE)
    assert [r.round for r in ledger.rounds] == [1] and ledger.epsilon == pytest.approx(one)

    second: dict[str, float | int] = {}
    assert not guarded_round(budget(tmp_path, limit, 2), train, second)
    assert len(trained) == 1  # it never trained
    assert second["refused"] == 1 and second["num-examples"] == 0
    assert second["epsilon"] == pytest.approx(one)  # what is spent, not what would be
    assert [r.round for r in read_ledger(tmp_path / LEDGER_FILE).rounds] == [1]


def test_noise_is_calibrated_once_for_the_planned_rounds(tmp_path: Path) -> None:
    privacy = PrivacyConfig(epsilon=4.0, delta=DELTA)  # noise_multiplier: calibrated
    plan = RoundBudget(site="a", state_dir=tmp_path, privacy=privacy, server_round=1,
                       steps=STEPS, planned_steps=5 * STEPS, units=1000, sample_rate=RATE)
    sigmas = []
    for round_number in range(1, 6):
        metrics: dict[str, float | int] = {}
        assert guarded_round(RoundBudget(**{**plan.__dict__, "server_round": round_number}),
                             lambda dp: sigmas.append(dp.noise_multiplier) or STEPS, metrics)
    assert len(set(sigmas)) == 1  # one calibration, kept in the ledger
    assert read_ledger(tmp_path / LEDGER_FILE).epsilon <= 4.0  # the plan spends the budget...
    assert read_ledger(tmp_path / LEDGER_FILE).epsilon > 3.9  # ...all of it
    refused: dict[str, float | int] = {}
    assert not guarded_round(RoundBudget(**{**plan.__dict__, "server_round": 6}),
                             lambda dp: STEPS, refused)  # a sixth round is over budget
