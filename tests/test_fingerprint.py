"""What a resumed run must match: fingerprints, old runs, and fields added later."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medmeta_common.checkpoint import checkpoint_payload
from medmeta_common.config import load_config
from medmeta_common.config.deploy import load_any_config
from medmeta_common.config.fingerprint import SCHEMA_VERSION, canonical, fingerprint
from medmeta_common.errors import CheckpointError
from server.state import RunState

FEDERATION = """
name: v1-run
description: made by medmeta 0.1
seed: 4
rounds: 3
image: {size: 32, channels: 1}
model: {preset: small, weight_standardization: true}
train: {local_steps: 7, batch_size: 16, lr: 0.05}
privacy: {epsilon: 4.0}
server: {min_sites: 2, optimizer: momentum, evaluate_every: 2}
evaluation: {ways: 2, shots: 3, queries: 4, episodes: 9}
sites:
  - name: a
    data: {path: "builtin:demo/site-0", split: null}
  - name: b
    data: {path: "builtin:demo/site-1", split: null, frames: all}
    privacy: {epsilon: 2.0, unit: image}
  - name: c
    task: segmentation
    tile: 96
    data: {path: "builtin:demo/site-2"}
held_out:
  name: new
  data: {path: "builtin:demo/site-3", split: null}
"""

SERVER = """
kind: server
name: v1-server
rounds: 5
state_dir: state
superlink: {insecure: true}
train: {local_steps: 9}
server: {update_encoding: int8, evaluate_every: 3}
evaluation: {ways: 2, shots: 2, queries: 3, episodes: 5}
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_schema_1_fingerprints_are_those_medmeta_0_1_computed(tmp_path: Path) -> None:
    # Computed by medmeta 0.1 (commit fe2035e) from these very files.
    assert load_any_config(write(tmp_path, FEDERATION)).legacy_hash() == "654ecddc9eb001bd"
    assert load_any_config(write(tmp_path, SERVER)).legacy_hash() == "7090279d2edde822"
    one_site = "sites:\n  - name: a\n    data: {path: builtin:demo/site-0}\n"
    # ...and by commit 39832b6, before the aggregator settings existed.
    assert load_config(write(tmp_path, "name: pinned\n" + one_site)).legacy_hash() == \
        "afb5402931d96a79"
    changed = load_config(write(tmp_path, "name: pinned\nserver: {aggregator: median}\n"
                                + one_site))
    assert changed.legacy_hash() != "afb5402931d96a79"


@dataclass(frozen=True)
class Before:
    size: int = 32
    name: str = "x"


@dataclass(frozen=True)
class After:  # the same section after a release added a setting with a default
    size: int = 32
    name: str = "x"
    added: tuple[int, ...] = field(default=(1, 2))


def test_a_field_added_with_a_default_keeps_older_fingerprints() -> None:
    assert canonical(After(size=64)) == {"size": 64}
    assert fingerprint({"s": Before(size=64)}) == fingerprint({"s": After(size=64)})
    assert fingerprint({"s": After(size=64, added=(3,))}) != fingerprint({"s": Before(size=64)})
    assert fingerprint({"s": Before(size=64)}) != fingerprint({"s": Before()})


def test_rounds_and_description_may_change_nothing_else(tmp_path: Path) -> None:
    base = load_config(write(tmp_path, FEDERATION))
    more = load_config(write(tmp_path, FEDERATION.replace("rounds: 3", "rounds: 9")
                             .replace("made by", "written by")))
    assert more.hash() == base.hash()
    other = load_config(write(tmp_path, FEDERATION.replace("lr: 0.05", "lr: 0.06")))
    assert other.hash() != base.hash()


def save_round(out: Path, config_hash: str, *, schema: int | None) -> None:
    payload = checkpoint_payload(round_number=1, encoder_state={}, image={}, model={},
                                 config_hash=config_hash, federation="f")
    if schema is None:  # written by medmeta 0.1, which named no schema
        payload.pop("config_schema")
    else:
        payload["config_schema"] = schema
    RunState(out).save_checkpoint(1, payload)


def test_old_and_new_checkpoints_resume_and_others_are_refused(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FEDERATION))
    save_round(tmp_path / "old", "654ecddc9eb001bd", schema=None)
    assert RunState(tmp_path / "old").check_resumable(config)["round"] == 1
    save_round(tmp_path / "new", config.hash(), schema=SCHEMA_VERSION)
    assert RunState(tmp_path / "new").check_resumable(config)["round"] == 1
    save_round(tmp_path / "mixed", "654ecddc9eb001bd", schema=SCHEMA_VERSION)
    with pytest.raises(CheckpointError, match="another configuration"):
        RunState(tmp_path / "mixed").check_resumable(config)
    save_round(tmp_path / "future", config.hash(), schema=SCHEMA_VERSION + 1)
    with pytest.raises(CheckpointError, match="upgrade medmeta"):
        RunState(tmp_path / "future").check_resumable(config)
