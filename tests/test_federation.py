"""End to end through the real Strategy and ClientApp: real sites, real Opacus, real messages.

One federation of four real-data sites runs two rounds (module fixture); the tests
then inspect every message the sites sent, the checkpoints, the ledgers, a site that
ran out of budget, adaptation at a held-out site, and a resumed third round.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message

from client.site import site_splits
from client.tasks.classification import poisson_rate_for
from medmeta.simulate import SimulatedSites, run_simulation
from medmeta_common.config import load_config
from medmeta_common.models.factory import build_encoder
from medmeta_common.privacy.accounting import default_delta, epsilon_of
from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger
from medmeta_common.protocol import EVALUATE_METRICS, TRAIN_METRICS, layout_of
from medmeta_common.wire import arrays_to_numpy
from server.state import RunState
from tests.conftest import SHARED_DATA, shared_file

pytestmark = pytest.mark.slow

CONFIG = """
name: e2e
seed: 0
rounds: 2
image: {{size: 32, channels: 1}}
train: {{local_steps: 5, batch_size: 32, lr: 0.1}}
privacy: {{epsilon: 50.0, noise_multiplier: 1.0}}
server: {{min_sites: 2}}
evaluation: {{ways: 2, shots: 3, queries: 5, episodes: 10}}
sites:
  - name: brain
    data: {{path: {data}/brain_tumor_mri/brain_tumor_mri_64.npz, partition: {{parts: 6, index: 0}}}}
  - name: blood
    data: {{path: {data}/pbc_blood/pbc_blood_5class_28.npz, partition: {{parts: 12, index: 0}}}}
  - name: chest
    data: {{path: {data}/medmnist/pneumoniamnist_28.npz, partition: {{parts: 10, index: 0}}}}
  - name: frugal
    data: {{path: {data}/brain_tumor_mri/brain_tumor_mri_64.npz, partition: {{parts: 6, index: 1}}}}
    privacy: {{epsilon: {frugal_budget}, noise_multiplier: 1.0}}
held_out:
  name: cells
  data: {{path: {data}/bccd/bccd_cells_32.npz, split: test}}
"""


@dataclass
class Run:
    config_path: Path
    out: Path
    replies: list[Message]
    frugal_budget: float


def frugal_budget_for_one_round(tmp: Path) -> float:
    """A budget between the epsilon of one and of two rounds at the frugal site."""
    probe = tmp / "probe.yaml"
    probe.write_text(CONFIG.format(data=SHARED_DATA, frugal_budget=1.0))
    config = load_config(probe)
    site = SimulatedSites(config, tmp)(Context(0, 0, {"partition-id": 3}, {}, {}))  # type: ignore[arg-type]
    train = site_splits(site, config.image, config.seed).train
    rate = poisson_rate_for(config.train, len(train), len(train.classes))
    delta = default_delta(len(train))
    steps = config.train.local_steps
    accountant = config.privacy_of(config.sites[3]).accountant
    one, two = (epsilon_of([(1.0, rate, k * steps)], delta, accountant) for k in (1, 2))
    return (one + two) / 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    tmp = tmp_path_factory.mktemp("federation")
    budget = frugal_budget_for_one_round(tmp)
    config_path = tmp / "federation.yaml"
    config_path.write_text(CONFIG.format(data=SHARED_DATA, frugal_budget=budget))
    config = load_config(config_path)
    out = tmp / "run"
    replies = run_simulation(config, out).replies
    return Run(config_path, out, replies, budget)


def test_sites_send_only_encoder_count_and_allowed_metrics(run: Run) -> None:
    config = load_config(run.config_path)
    layout = layout_of(build_encoder(config.model, config.image, config.seed))
    kinds = {"train": 0, "evaluate": 0, "query": 0}
    validated = 0
    for reply in run.replies:
        assert not reply.has_error(), reply.error.reason
        content = reply.content
        kind = reply.metadata.message_type
        kinds[kind] += 1
        if kind == "query":
            assert set(content) == {"site"}
            assert dict(content.config_records["site"]).keys() == {"name"}
            continue
        metrics = content.metric_records["metrics"]
        allowed = TRAIN_METRICS if kind == "train" else EVALUATE_METRICS
        assert set(metrics) <= allowed
        assert all(isinstance(v, (int, float)) for v in metrics.values())
        assert not content.config_records
        if "validation" in content:  # round 1's encoder, scored in round 2's train replies
            assert kind == "train"
            validation = content.metric_records["validation"]
            assert set(validation) <= EVALUATE_METRICS and "accuracy" in validation
            assert all(isinstance(v, (int, float)) for v in validation.values())
            validated += 1
        if kind == "train" and not metrics.get("refused"):
            assert set(content) - {"validation"} == {"arrays", "metrics"}
            # On the wire: one packed array and its index (not one object per tensor).
            assert set(content.array_records["arrays"]) == {"packed-index",
                                                           "packed-data:float32"}
            arrays = arrays_to_numpy(content.array_records["arrays"])
            assert {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()} == {
                k: (shape, dtype) for k, (shape, dtype) in layout.items()}
            assert metrics["num-examples"] > 0 and metrics["dp"] == 1
            assert "train-loss" not in metrics  # a non-private statistic of training data
        else:
            assert set(content) - {"validation"} == {"metrics"}
    # One message per site per round: round 1's validation rode on round 2's train
    # messages (all 4 sites, the refusing one too); only the last round is evaluated
    # by its own messages. Queries: each site's name once, and the end of the run.
    assert validated == 4
    assert kinds == {"train": 8, "evaluate": 4, "query": 8}


def test_frugal_site_refuses_and_the_round_completes_without_it(run: Run) -> None:
    records = RunState(run.out).read_metrics()
    train = {r["round"]: r for r in records if r["phase"] == "train"}
    assert train[1]["sites"]["frugal"]["status"] == "accepted"
    assert train[2]["sites"]["frugal"]["status"] == "refused"
    assert train[2]["accepted"] == 3
    ledger = read_ledger(run.out / "sites" / "frugal" / LEDGER_FILE)
    assert ledger.epsilon <= run.frugal_budget and len(ledger.rounds) == 1


def test_checkpoints_metrics_plots_and_report_inputs(run: Run) -> None:
    state = RunState(run.out)
    assert [p.name for p in state.checkpoints()] == ["round-0001.pt", "round-0002.pt"]
    assert state.latest()["round"] == 2  # type: ignore[index]
    assert (run.out / "learning_curve.png").stat().st_size > 1000
    assert (run.out / "privacy_epsilon.png").stat().st_size > 1000
    rows = (run.out / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("round,accepted_sites") and len(rows) == 3


def test_adapt_held_out_site_beats_chance(run: Run) -> None:
    bccd = shared_file("bccd/bccd_cells_32.npz")
    result = subprocess.run(
        [sys.executable, "-m", "medmeta.cli", "adapt", "--checkpoint", str(run.out), "--data",
         str(bccd), "--split", "test", "--ways", "3", "--shots", "5", "--episodes", "100",
         "--json"], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)
    assert set(report) == {"accuracy_mean", "accuracy_ci95", "ways", "shots", "episodes"}
    assert (report["ways"], report["shots"], report["episodes"]) == (3, 5, 100)
    assert report["accuracy_mean"] - report["accuracy_ci95"] > 1 / 3 + 0.15


def test_privacy_report_json(run: Run) -> None:
    result = subprocess.run([sys.executable, "-m", "medmeta.cli", "privacy", "report",
                             "--state", str(run.out), "--json"],
                            capture_output=True, text=True, check=True)
    sites = json.loads(result.stdout)["sites"]
    assert set(sites) == {"brain", "blood", "chest", "frugal"}
    for name in sites:
        assert set(sites[name]) >= {"epsilon", "delta", "steps"}
    assert sites["brain"]["steps"] == 10 and sites["frugal"]["steps"] == 5


def test_resume_continues_counting_and_spending(run: Run) -> None:
    before = {n: read_ledger(run.out / "sites" / n / LEDGER_FILE).epsilon
              for n in ("brain", "blood", "chest")}
    config = replace(load_config(run.config_path), rounds=3)
    run_simulation(config, run.out, resume=True)
    state = RunState(run.out)
    assert state.latest()["round"] == 3  # type: ignore[index]
    rounds = [(r["round"], r["phase"]) for r in state.read_metrics()]
    assert rounds == [(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate"),
                      (3, "train"), (3, "evaluate")]
    for name, eps in before.items():
        ledger = read_ledger(run.out / "sites" / name / LEDGER_FILE)
        assert ledger.epsilon > eps
        assert [r.round for r in ledger.rounds] == [1, 2, 3]
    frugal = read_ledger(run.out / "sites" / "frugal" / LEDGER_FILE)
    assert len(frugal.rounds) == 1  # still refusing: its spend is never reset
    assert np.isfinite(frugal.epsilon)


def test_resume_with_another_config_is_refused(run: Run, tmp_path: Path) -> None:
    from medmeta_common.errors import CheckpointError

    other = replace(load_config(run.config_path), seed=5)
    with pytest.raises(CheckpointError, match="another configuration"):
        run_simulation(other, run.out, resume=True)
    with pytest.raises(CheckpointError, match="already holds a run"):
        run_simulation(load_config(run.config_path), run.out, resume=False)
