"""Aggregators, the update-norm bound and their settings, with numbers checkable by hand."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, get_args, get_type_hints

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.multikrum import select_multikrum

from medmeta_common.config import MetaUpdateConfig, load_config
from medmeta_common.errors import ConfigError
from medmeta_common.protocol import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES
from medmeta_common.wire import arrays_to_numpy, numpy_to_arrays
from server.aggregation import (
    AGGREGATORS,
    aggregate,
    coordinate_median,
    multikrum_select,
    pairwise_sq_distances,
    trimmed_mean,
    weighted_mean,
)
from server.meta_update import MetaOptimizer
from server.round_outcome import RoundsFailedError, site_reasons
from server.strategy import MetaStrategy
from server.update_checks import screen_update, update_norm


def states_of(*values: list[float]) -> list[dict[str, np.ndarray]]:
    """One single-array state per value list (float32, like encoders)."""
    return [{"w": np.asarray(v, dtype=np.float32)} for v in values]


# --- the aggregators -----------------------------------------------------------------


def test_weighted_mean_by_hand() -> None:
    out = weighted_mean(states_of([0.0], [3.0]), [1, 2])
    assert out["w"].tolist() == [2.0]  # (0 * 1 + 3 * 2) / 3
    assert out["w"].dtype == np.float32


def test_trimmed_mean_cuts_one_value_at_each_end_per_coordinate() -> None:
    # coordinate 0: [1, 2, 3, 100] -> mean(2, 3); coordinate 1: [-100, 2, 3, 4] -> mean(2, 3)
    states = states_of([1, -100], [2, 2], [3, 3], [100, 4])
    out = trimmed_mean(states, 0.25)
    np.testing.assert_allclose(out["w"], [2.5, 2.5])
    assert out["w"].dtype == np.float32


def test_trimmed_mean_cuts_nothing_below_one_over_the_fraction() -> None:
    # int(0.2 * 4) = 0: the plain (unweighted) mean, as documented
    out = trimmed_mean(states_of([1], [2], [3], [100]), 0.2)
    np.testing.assert_allclose(out["w"], [26.5])


def test_trimmed_mean_refuses_half_or_more() -> None:
    with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0.5\), not 0.5"):
        trimmed_mean(states_of([1], [2]), 0.5)


def test_median_by_hand_and_ignores_weights() -> None:
    np.testing.assert_allclose(coordinate_median(states_of([1], [2], [100]))["w"], [2.0])
    states = states_of([1, 7], [2, 5], [3, 6], [100, 8])
    out = aggregate(states, [1, 1, 1, 1000], method="median")
    np.testing.assert_allclose(out["w"], [2.5, 6.5])


def test_multikrum_drops_the_outlier_then_weights_the_rest() -> None:
    # n = 5, f = 1: each score sums the 2 nearest squared distances:
    # 0 -> .01 + .04, 0.1 -> .01 + .01, 0.2 -> .01 + .01, 0.3 -> .01 + .04,
    # 10 -> 9.7^2 + 9.8^2 = 190.13; the 4 lowest are kept.
    states = states_of([0.0], [0.1], [0.2], [0.3], [10.0])
    assert multikrum_select(pairwise_sq_distances(states), max_faulty=1) == [0, 1, 2, 3]
    out = aggregate(states, [3, 1, 1, 1, 100], method="multikrum", max_faulty=1)
    np.testing.assert_allclose(out["w"], [0.1], rtol=1e-6)  # (0*3 + .1 + .2 + .3) / 6


def test_multikrum_keeps_one_when_f_is_too_large() -> None:
    assert multikrum_select(np.zeros((3, 3)), max_faulty=5) == [0]
    assert multikrum_select(np.zeros((1, 1)), max_faulty=1) == [0]


@pytest.mark.parametrize("seed", range(5))
def test_multikrum_selects_what_flower_selects(seed: int) -> None:
    rng = np.random.default_rng(seed)
    states = [{"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4) * (1 + 5 * (i == 2))}
              for i in range(7)]
    contents = [RecordDict({"arrays": ArrayRecord(numpy_ndarrays=[s["a"], s["b"]])})
                for s in states]
    theirs = select_multikrum(contents, num_malicious_nodes=2, num_nodes_to_select=5)
    expected = sorted(contents.index(c) for c in theirs)
    assert multikrum_select(pairwise_sq_distances(states), max_faulty=2) == expected


def test_distances_stay_exact_far_from_the_origin() -> None:
    # float32 encoders near 1000, 0.5 apart in one coordinate of 10 000
    base = np.full(10_000, 1000.0, dtype=np.float32)
    moved = base.copy()
    moved[0] += 0.5
    distances = pairwise_sq_distances([{"w": base}, {"w": moved}])
    np.testing.assert_allclose(distances, [[0.0, 0.25], [0.25, 0.0]], atol=1e-9)


@pytest.mark.parametrize("method", AGGREGATORS)
def test_aggregating_encoders_equals_aggregating_updates(method: str) -> None:
    rng = np.random.default_rng(0)
    current = {"w": rng.normal(size=6)}
    states = [{"w": current["w"] + rng.normal(size=6)} for _ in range(6)]
    weights = [1, 2, 3, 1, 2, 3]
    direct = aggregate(states, weights, method=method, trim_fraction=0.2, max_faulty=1)
    updates = [{"w": s["w"] - current["w"]} for s in states]
    via_updates = aggregate(updates, weights, method=method, trim_fraction=0.2, max_faulty=1)
    np.testing.assert_allclose(direct["w"], current["w"] + via_updates["w"], atol=1e-12)


def test_unknown_aggregator_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown aggregator 'krum'; choose one of mean, "):
        aggregate(states_of([1]), [1], method="krum")


def test_nothing_to_aggregate() -> None:
    for method in AGGREGATORS:
        with pytest.raises(ValueError, match="nothing to aggregate"):
            aggregate([], [], method=method)


def test_config_choices_are_the_aggregators() -> None:
    choices = get_args(get_type_hints(MetaUpdateConfig)["aggregator"])
    assert choices == AGGREGATORS


# --- the update-norm bound -----------------------------------------------------------

LAYOUT: dict[str, tuple[tuple[int, ...], str]] = {"w": ((2,), "float32")}
CURRENT = {"w": np.asarray([1.0, 1.0], dtype=np.float32)}


def test_update_norm_by_hand() -> None:
    assert update_norm({"w": np.asarray([4.0, 5.0])}, CURRENT) == pytest.approx(5.0)  # 3-4-5


def test_norm_bound_rejects_long_updates_only_when_set() -> None:
    long = {"w": np.asarray([4.0, 5.0], dtype=np.float32)}
    assert screen_update(long, CURRENT, LAYOUT, max_update_norm=None) is None
    assert screen_update(long, CURRENT, LAYOUT, max_update_norm=5.0) is None
    assert screen_update(long, CURRENT, LAYOUT, max_update_norm=4.9) == \
        "update norm 5 exceeds server.max_update_norm = 4.9"


def test_non_finite_updates_are_rejected_before_the_norm() -> None:
    broken = {"w": np.asarray([np.nan, 1.0], dtype=np.float32)}
    assert screen_update(broken, CURRENT, LAYOUT, max_update_norm=None) == \
        "w holds NaN or infinite values"


# Site node ids (Flower reserves node 1 for the SuperLink's own error replies).
NODE_BASE = 100


@dataclass
class Reply:
    """What ``aggregate_train`` reads of a Flower reply (a site's answer, no transport)."""

    content: RecordDict
    metadata: SimpleNamespace

    def has_error(self) -> bool:
        return False


def reply(node: int, values: list[float], records: int = 10) -> Reply:
    content = RecordDict({ARRAYS_KEY: numpy_to_arrays({"w": np.asarray(values, np.float32)}),
                          METRICS_KEY: MetricRecord({NUM_EXAMPLES: records, "refused": 0})})
    return Reply(content, SimpleNamespace(src_node_id=NODE_BASE + node))


class Recorder:
    def __init__(self) -> None:
        self.rounds: list[tuple[dict[str, np.ndarray], dict[str, Any]]] = []
        self.failed: list[dict[str, Any]] = []

    def train_done(self, round_number: int, encoder: dict[str, np.ndarray],
                   record: dict[str, Any]) -> None:
        self.rounds.append((encoder, record))

    def evaluate_done(self, round_number: int, record: dict[str, Any]) -> None:
        pass

    def round_failed(self, round_number: int, record: dict[str, Any]) -> None:
        self.failed.append(dict(record))

    def round_started(self, round_number: int, phase: str, sites: list[str]) -> None:
        pass


def strategy_with(server: MetaUpdateConfig) -> tuple[MetaStrategy, Recorder]:
    recorder = Recorder()
    strategy = MetaStrategy(meta_optimizer=MetaOptimizer(server, CURRENT), layout=LAYOUT,
                            min_sites=2, round_offset=0, recorder=recorder,
                            max_failed_rounds=server.max_failed_rounds)
    strategy.site_names = {NODE_BASE + i: f"hospital-{c}" for i, c in enumerate("abcd", 1)}
    strategy._current = dict(CURRENT)  # what configure_train stores from the round's arrays
    return strategy, recorder


def test_strategy_rejects_long_and_nan_updates_by_site_name(
        caplog: pytest.LogCaptureFixture) -> None:
    strategy, recorder = strategy_with(MetaUpdateConfig(max_update_norm=1.0,
                                                        aggregator="median"))
    replies = [reply(1, [1.5, 1.0]), reply(2, [1.0, 1.5]), reply(3, [4.0, 5.0]),
               reply(4, [np.nan, 1.0])]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        strategy.aggregate_train(1, replies)  # type: ignore[arg-type]
    encoder, record = recorder.rounds[0]
    np.testing.assert_allclose(encoder["w"], [1.25, 1.25])  # median of the two accepted
    sites = record["sites"]
    assert record["accepted"] == 2
    assert sites["hospital-a"]["status"] == "accepted"
    assert sites["hospital-a"]["update_norm"] == pytest.approx(0.5)
    assert sites["hospital-c"] == {"status": "rejected", "reason":
                                   "update norm 5 exceeds server.max_update_norm = 1"}
    assert sites["hospital-d"]["status"] == "rejected"
    assert "NaN" in sites["hospital-d"]["reason"]
    assert "rejected update from site hospital-c: update norm 5 exceeds" in caplog.text
    assert "rejected update from site hospital-d: w holds NaN" in caplog.text


def test_a_round_below_quorum_fails_is_retried_and_then_stops_the_run(
        caplog: pytest.LogCaptureFixture) -> None:
    strategy, recorder = strategy_with(MetaUpdateConfig(max_update_norm=0.1,
                                                        max_failed_rounds=2))
    long_updates = [reply(1, [1.5, 1.0]), reply(2, [1.0, 1.5])]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        arrays, _ = strategy.aggregate_train(1, long_updates)  # type: ignore[arg-type]
    # No meta-update, nothing for a checkpoint, and the same round is asked again.
    assert recorder.rounds == []
    np.testing.assert_array_equal(arrays_to_numpy(arrays)["w"], CURRENT["w"])
    assert strategy.rounds_done == 0 and strategy.next_round == 1
    first = recorder.failed[0]
    assert first["phase"] == "failed" and first["round"] == 1 and first["attempt"] == 1
    assert first["reason"] == "0 accepted update(s), fewer than min_sites=2"
    assert "round 1 failed (attempt 1 of 2)" in caplog.text
    # The second failure in a row stops the run, naming each site's reason.
    with pytest.raises(RoundsFailedError) as stopped:
        strategy.aggregate_train(2, long_updates)  # type: ignore[arg-type]
    message = str(stopped.value)
    assert message.startswith("round 1 failed 2 time(s) in a row (0 accepted update(s), "
                              "fewer than min_sites=2); the run stops.")
    assert "hospital-a: rejected: update norm 0.5 exceeds server.max_update_norm = 0.1" in \
        message
    assert "hospital-b: rejected: update norm 0.5" in message
    assert stopped.value.exit_code != 0


def test_a_successful_round_resets_the_failure_count_and_advances() -> None:
    strategy, recorder = strategy_with(MetaUpdateConfig(max_failed_rounds=2))
    strategy.aggregate_train(1, [reply(1, [1.5, 1.0])])  # type: ignore[list-item]
    assert strategy.failed_in_a_row == 1 and strategy.next_round == 1
    strategy.begin_round(strategy.current)  # what configure_train does
    strategy.aggregate_train(2, [reply(1, [1.5, 1.0]), reply(2, [1.0, 1.5])])  # type: ignore[list-item]
    assert strategy.failed_in_a_row == 0 and strategy.rounds_done == 1
    assert [r["round"] for _, r in recorder.rounds] == [1]
    # A refusal is named with the budget the site reported.
    refused = Reply(RecordDict({METRICS_KEY: MetricRecord({
        NUM_EXAMPLES: 0, "refused": 1, "epsilon": 7.99, "epsilon-budget": 8.0})}),
        SimpleNamespace(src_node_id=NODE_BASE + 3))
    strategy.begin_round(strategy.current)
    strategy.aggregate_train(3, [reply(1, [1.5, 1.0]), refused])  # type: ignore[list-item]
    assert recorder.failed[-1]["round"] == 2
    assert site_reasons(recorder.failed[-1]["sites"]) == {
        "hospital-c": "refused: its privacy budget is spent (epsilon 7.990 of 8)"}


# --- settings ------------------------------------------------------------------------

FIVE_SITES = "sites:\n" + "".join(f"  - name: s{i}\n    data: {{path: builtin:demo/site-0}}\n"
                                  for i in range(5))


def write(tmp_path: Path, server: str, sites: str = FIVE_SITES) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(f"server: {server}\n" + sites)
    return path


def test_defaults_are_the_plain_mean_without_bound(tmp_path: Path) -> None:
    server = load_config(write(tmp_path, "{}")).server
    assert (server.aggregator, server.trim_fraction, server.max_faulty,
            server.max_update_norm) == ("mean", 0.2, 1, None)


@pytest.mark.parametrize(("server", "field", "expected"), [
    ("{aggregator: krum}", "server.aggregator", "one of 'mean', 'trimmed_mean'"),
    ("{trim_fraction: 0.5}", "server.trim_fraction", "a number in [0, 0.5)"),
    ("{max_faulty: -1}", "server.max_faulty", "0 or more"),
    ("{max_update_norm: 0}", "server.max_update_norm", "a positive number or null"),
    ("{aggregator: trimmed_mean, trim_fraction: 0.1}", "server.trim_fraction",
     "at least 1/5 with 5 sites"),
    ("{aggregator: multikrum, max_faulty: 2}", "server.max_faulty", "2 f + 2 < 5 sites"),
])
def test_bad_server_settings_are_named(tmp_path: Path, server: str, field: str,
                                       expected: str) -> None:
    path = write(tmp_path, server)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == field
    assert expected in info.value.expected
    assert str(path) in str(info.value)


def test_robust_settings_are_accepted(tmp_path: Path) -> None:
    text = "{aggregator: multikrum, max_faulty: 1, max_update_norm: 3.5}"
    server = load_config(write(tmp_path, text)).server
    assert (server.aggregator, server.max_faulty, server.max_update_norm) == \
        ("multikrum", 1, 3.5)


def test_a_packed_update_that_does_not_add_up_is_rejected_by_site_name(
        caplog: pytest.LogCaptureFixture) -> None:
    strategy, recorder = strategy_with(MetaUpdateConfig())
    short = reply(3, [1.0, 1.0])
    packed = short.content.array_records[ARRAYS_KEY]
    packed["packed-data:float32"] = Array(np.asarray([1.0], np.float32))  # one value missing
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        strategy.aggregate_train(1, [reply(1, [1.0, 2.0]), reply(2, [2.0, 1.0]), short])  # type: ignore[arg-type]
    _, record = recorder.rounds[0]
    assert record["accepted"] == 2
    assert record["sites"]["hospital-c"] == {
        "status": "rejected", "reason": "packed float32 data too short for 'w'"}
    assert "rejected update from site hospital-c: packed float32 data too short" in caplog.text


def test_the_superlinks_own_error_replies_are_not_counted_as_a_site(
        caplog: pytest.LogCaptureFixture) -> None:
    from flwr.app import Error

    strategy, recorder = strategy_with(MetaUpdateConfig())
    strategy._asked = [NODE_BASE + 1, NODE_BASE + 2, NODE_BASE + 3]
    undeliverable = Reply(RecordDict(), SimpleNamespace(src_node_id=1))
    undeliverable.has_error = lambda: True  # type: ignore[method-assign]
    undeliverable.error = Error(code=0, reason="node unavailable")  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="server.strategy"):
        strategy.aggregate_train(1, [reply(1, [1.0, 2.0]), reply(2, [2.0, 1.0]),  # type: ignore[list-item]
                                     undeliverable])
    _, record = recorder.rounds[0]
    assert set(record["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}  # no "node-1"
    assert record["sites"]["hospital-c"] == {"status": "dropped"}
    assert "could not deliver a message to a site: node unavailable" in caplog.text
