"""The run's state on disk: checkpoints after every round and an append-only metrics log.

A run directory holds ``checkpoints/round-NNNN.pt`` (the newest few are kept),
``metrics.jsonl`` (one JSON object per round and phase; ``phase: failed`` lines are
attempts of a round that did not count) and ``progress.json`` (what the server is
doing now: the round and phase in progress, or that the run finished or failed). On
resume, metric lines of rounds after the last checkpoint are dropped, so no round
appears twice; failed attempts are kept, as history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from medmeta_common.checkpoint import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
)
from medmeta_common.config.fingerprint import SCHEMA_VERSION
from medmeta_common.errors import CheckpointError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"
# Written by `medmeta server start` when it registers the sites' keys: name -> node id.
REGISTERED_SITES_FILE = "sites.json"


class Fingerprinted(Protocol):
    """A configuration with fingerprints (:mod:`medmeta_common.config.fingerprint`)."""

    def hash(self) -> str:
        """The current schema's fingerprint."""

    def legacy_hash(self) -> str:
        """The schema-1 fingerprint."""


class RunState:
    """Checkpoints and metrics of one federation run.

    Parameters
    ----------
    out_dir : Path
        The run directory.
    keep : int
        How many of the newest checkpoints to keep.

    """

    def __init__(self, out_dir: Path, keep: int = 3) -> None:
        self.out_dir = Path(out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.metrics_path = self.out_dir / METRICS_FILE
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return sorted(self.checkpoint_dir.glob("round-*.pt")) if self.checkpoint_dir.is_dir() \
            else []

    def save_checkpoint(self, round_number: int, payload: dict[str, Any]) -> Path:
        """Write round ``round_number``'s checkpoint atomically; prune old ones."""
        path = self.checkpoint_dir / f"round-{round_number:04d}.pt"
        atomic_torch_save(path, payload)
        for old in self.checkpoints()[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint, or ``None`` for a fresh run directory."""
        if not self.checkpoints():
            return None
        return load_checkpoint(self.checkpoint_dir)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line and flush it to disk."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metric records (a torn last line from a crash is skipped)."""
        if not self.metrics_path.exists():
            return []
        records = []
        for number, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is incomplete (a crash mid-write?); ignoring it",
                            self.metrics_path, number)
        return records

    def drop_metrics_after(self, round_number: int) -> None:
        """Forget metrics of rounds after ``round_number`` (they will be re-run)."""
        kept = [r for r in self.read_metrics()
                if int(r.get("round", 0)) <= round_number or r.get("phase") == "failed"]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                     for r in kept))

    def record_config(self, config: Any) -> None:
        """Write ``config.json``: the resolved configuration (a dataclass) and its hash."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out_dir / "config.json", {
            "config_hash": config.hash(), "config_schema": SCHEMA_VERSION,
            **dataclasses.asdict(config)})

    def write_progress(self, progress: dict[str, Any]) -> None:
        """Replace ``progress.json`` (atomically: a reader never sees half of it)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out_dir / PROGRESS_FILE, progress)

    def read_progress(self) -> dict[str, Any]:
        """What the server last said it was doing (empty when it never ran)."""
        try:
            progress = json.loads((self.out_dir / PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return progress if isinstance(progress, dict) else {}

    def registered_sites(self) -> dict[int, str]:
        """Node id -> the name the operator registered its key under (deployment only)."""
        try:
            raw = json.loads((self.out_dir / REGISTERED_SITES_FILE).read_text())
            return {int(node): str(name) for name, node in raw.items() if str(node).isdigit()}
        except (OSError, ValueError, AttributeError):
            return {}

    def check_resumable(self, config: Fingerprinted) -> dict[str, Any]:
        """The checkpoint to resume from; refuse one made with a different config.

        A checkpoint names the fingerprint schema it was made with (none: schema 1,
        medmeta 0.1), and ``config`` is fingerprinted the same way.
        """
        latest = self.latest()
        if latest is None:
            raise CheckpointError(f"{self.out_dir}: nothing to resume (no checkpoints); run "
                                  "without --resume to start")
        schema = latest.get("config_schema", 1)
        expected = config.hash() if schema == SCHEMA_VERSION else \
            config.legacy_hash() if schema == 1 else None
        if expected is None:
            raise CheckpointError(f"{self.out_dir}: the checkpoint's config schema {schema} is "
                                  f"newer than this medmeta's ({SCHEMA_VERSION}); upgrade medmeta")
        if latest["config_hash"] != expected:
            raise CheckpointError(
                f"{self.out_dir}: the checkpoint was made with another configuration "
                f"(hash {latest['config_hash']}, now {expected}); resume with the same "
                "config (only --rounds may change) or use a new --out")
        return latest
