"""Failed rounds are failures: they do not count, are retried, stop the run, and cost privacy.

Real federations through the real Strategy and ClientApp on the built-in demo data (no
files needed), under DP-SGD with calibrated noise, so the budget arithmetic is real.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medmeta.cli import main
from medmeta.simulate import run_simulation
from medmeta_common.config import FederationConfig, load_config
from medmeta_common.errors import FederationError
from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger
from server.round_outcome import RoundsFailedError
from server.state import RunState
from tests.federations import fails_first_training, federation


def ledger(out: Path, site: str):  # type: ignore[no-untyped-def]
    return read_ledger(out / "sites" / site / LEDGER_FILE)


def test_every_site_failing_exits_nonzero_and_writes_no_round(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = federation(tmp_path, data_a=str(tmp_path / "gone-a.npz"),
                        data_b=str(tmp_path / "gone-b.npz"))
    code = main(["simulate", "--config", str(config), "--out", str(tmp_path / "run")])
    assert code == FederationError.exit_code
    error = capsys.readouterr().err
    assert "round 1 failed 2 time(s) in a row (0 accepted update(s), fewer than " \
           "min_sites=2); the run stops." in error
    assert "site-a: failed:" in error and "gone-a.npz" in error
    assert "site-b: failed:" in error and "gone-b.npz" in error
    state = RunState(tmp_path / "run")
    assert state.checkpoints() == []
    assert [(r["phase"], r["round"]) for r in state.read_metrics()] == [("failed", 1)] * 2
    assert state.read_progress()["status"] == "failed"


def retried_run(tmp_path: Path, server: str) -> tuple[FederationConfig, Path]:
    config = load_config(federation(tmp_path, server=server))
    out = tmp_path / "run"
    run_simulation(config, out, mods={"site-b": [fails_first_training()]})
    return config, out


@pytest.mark.slow
def test_a_retried_round_is_counted_in_the_ledger_and_spare_rounds_pay_for_it(
        tmp_path: Path) -> None:
    config, out = retried_run(tmp_path, ", spare_rounds: 1")
    metrics = RunState(out).read_metrics()
    assert [(r["phase"], r["round"]) for r in metrics if r["phase"] != "evaluate"] == [
        ("failed", 1), ("train", 1), ("train", 2)]
    assert metrics[0]["sites"]["site-b"]["status"] == "failed"
    # site-a trained in the failed attempt too: its update left the site, so it counts.
    a, b = ledger(out, "site-a"), ledger(out, "site-b")
    assert [r.round for r in a.rounds] == [1, 1, 2]
    assert [r.round for r in b.rounds] == [1, 2]
    # Calibrated for rounds + spare_rounds = 3 rounds: the retry fits in the budget.
    assert a.epsilon <= config.privacy.epsilon
    assert a.epsilon > b.epsilon
    assert [int(p.stem.split("-")[1]) for p in RunState(out).checkpoints()] == [1, 2]


@pytest.mark.slow
def test_without_spare_rounds_a_retry_exhausts_a_budget_and_the_run_stops_cleanly(
        tmp_path: Path) -> None:
    with pytest.raises(RoundsFailedError) as stopped:
        retried_run(tmp_path, "")
    message = str(stopped.value)
    assert "round 2 failed 2 time(s)" in message
    assert "site-a: refused: its privacy budget is spent" in message
    assert "server.spare_rounds" in message
    out = tmp_path / "run"
    a = ledger(out, "site-a")
    # The guard never overspends: the two rounds' worth of budget went on round 1 twice.
    assert [r.round for r in a.rounds] == [1, 1]
    assert a.epsilon <= 4.0
    assert [int(p.stem.split("-")[1]) for p in RunState(out).checkpoints()] == [1]


def test_resuming_a_finished_run_says_it_is_finished(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = dataclasses.replace(load_config(federation(tmp_path)), rounds=1)
    out = tmp_path / "run"
    run_simulation(config, out)
    caplog.clear()
    run_simulation(config, out, resume=True)
    assert "already FINISHED: all 1 of 1 rounds are done" in caplog.text
    assert [r["round"] for r in RunState(out).read_metrics() if r["phase"] == "train"] == [1]
