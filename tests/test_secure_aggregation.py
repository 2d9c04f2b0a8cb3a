"""Secure aggregation (Flower's SecAgg+) through the real Strategy and ClientApp, on real data.

The same federation round is run with plain and with secure aggregation (DP off, so
that the sites' training is reproducible and the two can be compared): the secure
meta-update equals the plain one within the quantisation error, also when one site
dies after the key exchange, and the server never receives a site's update in the
clear. Below the reconstruction threshold the round fails cleanly: it is retried, and
the run stops after ``server.max_failed_rounds`` attempts with nothing recorded as done.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from medmeta.simulate import run_simulation
from medmeta_common.config import FederationConfig, load_config
from medmeta_common.errors import ConfigError
from medmeta_common.protocol import TRAIN_METRICS
from server.round_outcome import RoundsFailedError
from server.state import RunState
from tests.conftest import SHARED_DATA, shared_file

CONFIG = """
name: secagg
seed: 0
rounds: 1
image: {{size: 32, channels: 1}}
train: {{local_steps: 5, batch_size: 32, lr: 0.1}}
privacy: {{enabled: false}}
server: {{min_sites: 2, fraction_evaluate: 0.0{secure}}}
sites:
  - name: brain
    data: {{path: {data}/brain_tumor_mri/brain_tumor_mri_64.npz, partition: {{parts: 6, index: 0}}}}
  - name: blood
    data: {{path: {data}/pbc_blood/pbc_blood_5class_28.npz, partition: {{parts: 12, index: 0}}}}
  - name: chest
    data: {{path: {data}/medmnist/pneumoniamnist_28.npz, partition: {{parts: 10, index: 0}}}}
"""
SECURE = ", secure_aggregation: {{reconstruction_threshold: {threshold}}}"


def write_config(tmp: Path, name: str, *, secure: bool, threshold: float = 0.67,
                 sites: tuple[str, ...] = ("brain", "blood", "chest")) -> FederationConfig:
    path = tmp / f"{name}.yaml"
    extra = SECURE.format(threshold=threshold).replace("{{", "{").replace("}}", "}")
    path.write_text(CONFIG.format(data=SHARED_DATA, secure=extra if secure else ""))
    config = load_config(path)
    return dataclasses.replace(config, sites=tuple(s for s in config.sites if s.name in sites))


def simulate(config: FederationConfig, out: Path, *, dead: str | None = None
             ) -> list[Message]:
    """Run ``config``; the ``dead`` site has lost its data: it fails when asked to train."""
    if dead is not None:
        sites = tuple(dataclasses.replace(s, data=dataclasses.replace(
            s.data, path=str(out.parent / "gone.npz"))) if s.name == dead else s
            for s in config.sites)
        config = dataclasses.replace(config, sites=sites)
    return run_simulation(config, out).replies


def encoder_of(out: Path) -> dict[str, np.ndarray]:
    latest = RunState(out).latest()
    return {k: v.numpy().astype(np.float64) for k, v in latest["encoder"].items()}


def train_record(out: Path, phase: str = "train") -> dict[str, Any]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in lines if r["phase"] == phase)


def quantisation_bound(config: FederationConfig, record: dict[str, Any]) -> float:
    """Largest per-coordinate error of SecAgg+'s stochastic quantisation of the mean update."""
    secure = config.server.secure_aggregation
    assert secure is not None
    q = secure.quantization_range
    ratios = [round(s["num-examples"] / secure.max_weight * q) / q
              for s in record["sites"].values() if s["status"] == "accepted"]
    step = 2 * secure.clipping_range / q
    return len(ratios) * step / sum(ratios) + 1e-6


def largest_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    tmp = tmp_path_factory.mktemp("plain")
    runs = {"all": tmp / "all", "without-chest": tmp / "without-chest"}
    simulate(write_config(tmp, "all", secure=False), runs["all"])
    simulate(write_config(tmp, "two", secure=False, sites=("brain", "blood")),
             runs["without-chest"])
    return runs


@pytest.mark.slow
def test_secure_sum_equals_plain_mean_and_no_update_leaves_in_clear(
        plain_runs: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path, "secure", secure=True)
    replies = simulate(config, tmp_path / "run")
    record = train_record(tmp_path / "run")
    assert record["secure_aggregation"] and record["accepted"] == 3
    plain, secure = encoder_of(plain_runs["all"]), encoder_of(tmp_path / "run")
    initial_move = record["update_norm"]
    assert initial_move > 1e-2  # the round really moved the encoder
    assert largest_difference(plain, secure) <= quantisation_bound(config, record)
    # What the server received: keys, encrypted shares, masked vectors and metrics only.
    for reply in replies:
        if reply.has_error():
            continue
        assert all(len(a) == 0 for a in reply.content.array_records.values())
        for metrics in reply.content.metric_records.values():
            # Flower's legacy fit format repeats the record count as "num_examples".
            assert set(metrics) <= TRAIN_METRICS | {"num_examples"}


@pytest.mark.slow
def test_site_dying_after_key_exchange_is_unmasked_from_shares(
        plain_runs: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path, "secure", secure=True)
    simulate(config, tmp_path / "run", dead="chest")
    record = train_record(tmp_path / "run")
    assert record["sites"]["chest"]["status"] == "dropped"
    assert record["accepted"] == 2 and "aborted" not in record
    plain, secure = encoder_of(plain_runs["without-chest"]), encoder_of(tmp_path / "run")
    assert largest_difference(plain, secure) <= quantisation_bound(config, record)


@pytest.mark.slow
def test_below_threshold_the_round_fails_and_no_round_is_recorded(tmp_path: Path) -> None:
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    config = write_config(tmp_path, "strict", secure=True, threshold=3)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                    max_failed_rounds=2))
    with pytest.raises(RoundsFailedError, match="round 1 failed 2 time"):
        simulate(config, tmp_path / "run", dead="chest")
    failed = [r for r in RunState(tmp_path / "run").read_metrics()]
    assert [(r["phase"], r["round"], r["attempt"]) for r in failed] == [
        ("failed", 1, 1), ("failed", 1, 2)]
    assert failed[0]["aborted"] and failed[0]["accepted"] == 0
    # The global encoder was never replaced: no round counts, no checkpoint exists.
    assert RunState(tmp_path / "run").checkpoints() == []


@pytest.mark.parametrize("setting", ["aggregator: median", "max_update_norm: 5.0",
                                     "central_dp: {clip: 1.0, noise_multiplier: 1.0}"])
def test_options_that_need_individual_updates_are_refused(tmp_path: Path, setting: str) -> None:
    path = tmp_path / "bad.yaml"
    text = CONFIG.format(data="/nowhere", secure=", secure_aggregation: {}, " + setting)
    path.write_text(text)
    with pytest.raises(ConfigError, match="secure_aggregation"):
        load_config(path)


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True])
def test_both_round_drivers_judge_a_reply_the_same_way(tmp_path: Path, secure: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A site whose reply carries a metric it may not release is rejected by the plain
    round and by the secure one; the secure round cannot take the update out of the
    masked sum, so it keeps the global encoder."""
    import client.app

    real = client.app.train_round

    def leaky(site, settings, encoder):  # type: ignore[no-untyped-def]
        outcome = real(site, settings, encoder)
        if site.name == "chest":
            outcome.metrics["secret"] = 1.0
        return outcome

    monkeypatch.setattr(client.app, "train_round", leaky)
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    config = write_config(tmp_path, "leak", secure=secure)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                    max_failed_rounds=1))
    if secure:
        # The rejected reply is inside the masked sum: the round fails, nothing counts.
        with pytest.raises(RoundsFailedError, match="chest: rejected: unexpected metrics"):
            simulate(config, tmp_path / "run")
        record = train_record(tmp_path / "run", phase="failed")
        assert record["accepted"] == 0 and "rejected_sum" in record
        assert RunState(tmp_path / "run").checkpoints() == []
    else:
        simulate(config, tmp_path / "run")
        record = train_record(tmp_path / "run")
        assert record["accepted"] == 2
        from medmeta_common.models.factory import build_encoder

        initial = {k: v.numpy().astype(np.float64)
                   for k, v in build_encoder(config.model, config.image, config.seed)
                   .state_dict().items()}
        assert largest_difference(initial, encoder_of(tmp_path / "run")) > 0.0
    assert record["sites"]["chest"]["status"] == "rejected"
    assert record["sites"]["chest"]["reason"] == "unexpected metrics ['secret']"
