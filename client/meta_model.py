"""The federation's meta-model at a site: the shared encoder and the settings to use it.

A new hospital loads it from a checkpoint file or a run directory (its newest
checkpoint) and adapts it to its own task, entirely locally (``client/tasks/``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from medmeta_common.checkpoint import find_checkpoint, load_checkpoint, torch_load
from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.config.typed import build
from medmeta_common.errors import CheckpointError, ConfigError
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.models.factory import build_encoder, load_trainable
from medmeta_common.models.prior import PRIORS_DIR, find_prior


@dataclass
class MetaModel:
    """The shared encoder as the federation left it, with the settings to use it."""

    encoder: SharedEncoder
    image: ImageConfig
    model: ModelConfig
    round: int
    federation: str


def model_settings(payload: dict[str, Any], source: str) -> tuple[ImageConfig, ModelConfig]:
    """The image and model settings a saved model names; :class:`CheckpointError` if bad."""
    try:
        return (build(ImageConfig, payload["image"], source=source, field="image"),
                build(ModelConfig, payload["model"], source=source, field="model"))
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{source}: settings missing or invalid ({exc})") from None


def saved_encoder(state: dict[str, torch.Tensor], image: ImageConfig, model: ModelConfig,
                  source: str) -> SharedEncoder:
    """An encoder of the named architecture holding the whole ``state`` (an adapted model)."""
    encoder = build_encoder(replace(model, weights="none"), image, 0)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: encoder weights do not fit its architecture "
                              f"({str(exc).splitlines()[0]})") from None
    return encoder.eval()


def load_meta_model(path: Path, priors: tuple[Path, ...] = ()) -> MetaModel:
    """Load the meta-model from a checkpoint file or a run directory (its newest checkpoint).

    A checkpoint holds the trainable parameters and names its prior by hash: the
    encoder is rebuilt on the prior (a file prior is found in ``priors`` or the run
    directory's ``priors/``) and the trainable parameters loaded onto it.
    """
    file = find_checkpoint(Path(path))
    payload = load_checkpoint(file)
    image, model = model_settings(payload, str(path))
    prior = payload.get("prior") or {"sha256": "none", "seed": "0"}
    prior_file = None
    if model.has_file_prior:
        run_dir = file.parent.parent if file.parent.name == "checkpoints" else file.parent
        prior_file = find_prior(str(prior["sha256"]), [*priors, run_dir / PRIORS_DIR])
    try:
        encoder = build_encoder(model, image, int(prior.get("seed", 0)), prior_file=prior_file)
        load_trainable(encoder, payload["encoder"])
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: encoder weights do not fit its architecture "
                              f"({str(exc).splitlines()[0]})") from None
    return MetaModel(encoder.eval(), image, model, int(payload["round"]),
                     str(payload.get("federation", "")))


def read_model_file(path: Path, kind: str, what: str) -> dict[str, Any]:
    """The payload of a saved model of ``kind``; :class:`CheckpointError` naming ``path``."""
    try:
        payload = torch_load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on a bad file
        raise CheckpointError(f"{path}: not a readable model ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise CheckpointError(f"{path}: not {what}")
    return payload
