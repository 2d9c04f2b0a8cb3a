"""The privacy ledger: exact accounting, persistence, refusal of unreadable state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmeta_common.errors import PrivacyBudgetError
from medmeta_common.privacy.accounting import calibrate_noise, epsilon_of
from medmeta_common.privacy.ledger import LEDGER_FILE, PrivacyLedger, ledger_lock, read_ledger


def open_ledger(tmp_path: Path, **kw: object) -> PrivacyLedger:
    args = {"site": "a", "delta": 1e-5, "epsilon_budget": 8.0} | kw
    return PrivacyLedger.open(tmp_path, **args)  # type: ignore[arg-type]


def test_epsilon_grows_and_survives_reopening(tmp_path: Path) -> None:
    ledger = open_ledger(tmp_path)
    assert ledger.epsilon == 0.0
    eps1 = ledger.record(1, 1.1, 0.05, 100)
    eps2 = ledger.record(2, 1.1, 0.05, 100)
    assert 0 < eps1 < eps2
    reopened = open_ledger(tmp_path)
    assert reopened.epsilon == pytest.approx(eps2)
    assert reopened.steps == 200 and [r.round for r in reopened.rounds] == [1, 2]
    # Same mechanism, merged: exactly the accountant value for 200 steps.
    assert eps2 == pytest.approx(epsilon_of([(1.1, 0.05, 200)], 1e-5))


def test_mixed_mechanisms_are_composed(tmp_path: Path) -> None:
    ledger = open_ledger(tmp_path)
    ledger.record(1, 1.0, 0.05, 50)
    ledger.record(2, 2.0, 0.10, 50)
    assert len(ledger.history) == 2
    assert ledger.epsilon > epsilon_of([(1.0, 0.05, 50)], 1e-5)


def test_calibrated_noise_spends_at_most_the_budget() -> None:
    sigma = calibrate_noise(epsilon=4.0, delta=1e-5, sample_rate=0.05, steps=300)
    spent = epsilon_of([(sigma, 0.05, 300)], 1e-5)
    assert spent <= 4.0
    assert spent > 3.95  # and not needlessly noisy


def test_corrupt_ledger_refuses_instead_of_resetting(tmp_path: Path) -> None:
    open_ledger(tmp_path).record(1, 1.0, 0.1, 10)
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(PrivacyBudgetError, match="resetting it would forget"):
        open_ledger(tmp_path)


def test_changed_delta_or_site_is_refused(tmp_path: Path) -> None:
    open_ledger(tmp_path).record(1, 1.0, 0.1, 10)
    with pytest.raises(PrivacyBudgetError, match="delta"):
        open_ledger(tmp_path, delta=1e-6)
    with pytest.raises(PrivacyBudgetError, match="belongs to site 'a'"):
        open_ledger(tmp_path, site="b")


def test_ledger_file_holds_the_full_history(tmp_path: Path) -> None:
    open_ledger(tmp_path).record(7, 1.3, 0.02, 40)
    saved = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert saved["history"] == [[1.3, 0.02, 40]]
    assert saved["accountant"] == "rdp" and saved["unit"] == "image"
    assert read_ledger(tmp_path / LEDGER_FILE).epsilon == pytest.approx(saved["epsilon_spent"])


def test_second_process_cannot_train_on_the_same_state(tmp_path: Path) -> None:
    with (ledger_lock(tmp_path), pytest.raises(PrivacyBudgetError, match="another process"),
          ledger_lock(tmp_path)):
        pass


def test_privacy_report_states_the_guarantee(tmp_path: Path) -> None:
    from medmeta_common.privacy.report import to_html, to_markdown

    ledger = open_ledger(tmp_path)
    ledger.record(1, 1.2, 0.05, 20, max_grad_norm=0.8)
    ledger.record(2, 1.2, 0.05, 20, max_grad_norm=0.8)
    for text in (to_markdown(ledger, "plot.png"), to_html(ledger)):
        assert f"{ledger.epsilon:.4f}" in text and "1.00e-05" in text
        assert "image" in text and "Balle et al. 2020" in text
        assert "0.8" in text and "1.2" in text and "0.05" in text
        assert "never" in text and "per-record gradients" in text
    assert "data:image/png;base64," in to_html(ledger)


def test_the_ledger_names_its_accountant_and_a_change_reaccounts_the_history(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = open_ledger(tmp_path)  # a ledger of medmeta 0.1: RDP
    old.record(1, 1.1, 0.05, 300)
    assert json.loads((tmp_path / LEDGER_FILE).read_text())["accountant"] == "rdp"
    reopened = open_ledger(tmp_path, accountant="prv")
    assert "accounted with prv" in caplog.text
    assert reopened.epsilon == pytest.approx(epsilon_of([(1.1, 0.05, 300)], 1e-5, "prv"))
    assert reopened.epsilon < epsilon_of([(1.1, 0.05, 300)], 1e-5, "rdp")
    reopened.record(2, 1.1, 0.05, 100)
    saved = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert saved["accountant"] == "prv" and "PRV" in saved["conversion"]
    assert read_ledger(tmp_path / LEDGER_FILE).accountant == "prv"
