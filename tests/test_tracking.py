"""TensorBoard event files next to metrics.jsonl: what `tensorboard --logdir runs/` shows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medmeta.simulate import run_simulation
from medmeta_common.config import SecureAggregationConfig, load_config
from tests.federations import federation

pytest.importorskip("tensorboard", reason="the tracking extra: pip install 'medmeta[tracking]'")


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_rounds_epsilon_and_update_norms_are_tracked(tmp_path: Path) -> None:
    config = dataclasses.replace(load_config(federation(tmp_path)), rounds=2)
    out = tmp_path / "run"
    run_simulation(config, out)
    assert list(out.glob("events.out.tfevents.*")), "no event file beside metrics.jsonl"
    tracked = scalars(out)
    assert [s for s, _ in tracked["round/accepted_sites"]] == [1, 2]
    assert [v for _, v in tracked["round/accepted_sites"]] == [2.0, 2.0]
    for site in ("site-a", "site-b"):
        eps = [v for _, v in tracked[f"privacy/epsilon/{site}"]]
        assert len(eps) == 2 and 0 < eps[0] < eps[1] <= 4.0
        assert len(tracked[f"update_norm/{site}"]) == 2
    assert len(tracked["validation/accuracy_mean"]) == 2


def test_secure_aggregation_tracks_only_the_aggregate_norm(tmp_path: Path) -> None:
    base = load_config(federation(tmp_path))
    config = dataclasses.replace(
        base, rounds=1, privacy=dataclasses.replace(base.privacy, enabled=False),
        server=dataclasses.replace(base.server, fraction_evaluate=0.0,
                                   secure_aggregation=SecureAggregationConfig()))
    out = tmp_path / "run"
    run_simulation(config, out)
    tracked = scalars(out)
    assert len(tracked["round/global_update_norm"]) == 1
    assert not [tag for tag in tracked if tag.startswith("update_norm/")]
