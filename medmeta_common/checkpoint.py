"""Atomic file writes: a crash mid-write never leaves a half-written output behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from medmeta_common.config.fingerprint import SCHEMA_VERSION


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write(path, lambda h: h.write(text.encode("utf-8")))


def atomic_write_json(path: Path, data: Any) -> None:
    """Atomically write JSON (pretty, sorted keys)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """Atomically ``torch.save`` an object of tensors and plain data."""
    atomic_write(path, lambda h: torch.save(obj, h))


def torch_load(path: Path) -> Any:
    """Load a file written by :func:`atomic_torch_save`, tensors and plain data only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- The meta-model checkpoint: what the server writes after each round ----------------

CHECKPOINT_FORMAT = 1
CHECKPOINT_KIND = "medmeta-meta-model"


def checkpoint_payload(
    *,
    round_number: int,
    encoder_state: dict[str, Any],
    image: dict[str, Any],
    model: dict[str, Any],
    config_hash: str,
    federation: str,
    server_optimizer: dict[str, Any] | None = None,
    prior: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Everything needed to resume the run or adapt the encoder at a new site."""
    return {
        "format": CHECKPOINT_FORMAT,
        "kind": CHECKPOINT_KIND,
        "round": round_number,
        "encoder": {k: torch.as_tensor(v) for k, v in encoder_state.items()},
        "image": image,
        "model": model,
        "config_hash": config_hash,
        "config_schema": SCHEMA_VERSION,
        "federation": federation,
        "server_optimizer": server_optimizer or {},
        # The frozen weights are not in the checkpoint: it names them by hash, with the
        # set of parameters ``encoder`` holds (absent: every parameter, a full encoder).
        "prior": prior or {"sha256": "none", "weights": "none", "trainable": "all"},
    }


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if a file, else the newest checkpoint of a run directory."""
    from medmeta_common.errors import CheckpointError

    path = Path(path)
    if path.is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = sorted(folder.glob("round-*.pt")) if folder.is_dir() else []
    if not candidates:
        raise CheckpointError(f"{path}: no checkpoint found (expected a .pt file or a run "
                              "directory with checkpoints/round-*.pt)")
    return candidates[-1]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and sanity-check a meta-model checkpoint (file or run directory)."""
    from medmeta_common.errors import CheckpointError

    file = find_checkpoint(path)
    try:
        payload = torch_load(file)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on a bad file
        raise CheckpointError(f"{file}: not a readable checkpoint ({type(exc).__name__}: "
                              f"{exc})") from None
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{file}: not a medmeta meta-model checkpoint")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file}: checkpoint format {payload.get('format')} is not "
                              f"supported (this medmeta reads format {CHECKPOINT_FORMAT})")
    return payload
