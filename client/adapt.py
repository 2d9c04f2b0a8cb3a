"""Adapt the global meta-model to a new site's task, entirely locally.

A new hospital loads the meta-model (a checkpoint file or a run directory), reads its
own labelled images in any supported format, and gets either an evaluation over
many few-shot episodes or an adapted classifier it can save and use for prediction.
Nothing leaves the site.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.fewshot import (
    FewShotResult,
    FinetuneMode,
    embed,
    evaluate_fewshot,
    finetune_all,
    fit_head,
)
from medmeta_common.checkpoint import (
    atomic_torch_save,
    atomic_write_json,
    load_checkpoint,
    torch_load,
)
from medmeta_common.config import DataConfig, FewShotConfig, ImageConfig, ModelConfig
from medmeta_common.config.typed import build
from medmeta_common.data.records import SiteData
from medmeta_common.data.sources import load_site
from medmeta_common.errors import CheckpointError, ConfigError
from medmeta_common.models.encoder import Encoder
from medmeta_common.models.factory import encoder_spec
from medmeta_common.models.heads import CosineClassifier

log = logging.getLogger(__name__)

ADAPTED_FILE = "adapted_model.pt"
ADAPTED_INFO = "adapted_model.json"


@dataclass
class MetaModel:
    """The shared encoder as the federation left it, with the settings to use it."""

    encoder: Encoder
    image: ImageConfig
    model: ModelConfig
    round: int
    federation: str


@dataclass
class AdaptedModel:
    """A site's classifier: the (possibly fine-tuned) encoder and a cosine head."""

    encoder: Encoder
    head: CosineClassifier
    classes: tuple[str, ...]
    image: ImageConfig
    model: ModelConfig
    info: dict[str, Any]


def _configs(payload: dict[str, Any], source: str) -> tuple[ImageConfig, ModelConfig]:
    try:
        return (build(ImageConfig, payload["image"], source=source, field="image"),
                build(ModelConfig, payload["model"], source=source, field="model"))
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{source}: settings missing or invalid ({exc})") from None


def _encoder(state: dict[str, torch.Tensor], image: ImageConfig, model: ModelConfig,
             source: str) -> Encoder:
    encoder = Encoder(encoder_spec(model, image))
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: encoder weights do not fit its architecture "
                              f"({str(exc).splitlines()[0]})") from None
    return encoder.eval()


def load_meta_model(path: Path) -> MetaModel:
    """Load the meta-model from a checkpoint file or a run directory (its newest checkpoint)."""
    payload = load_checkpoint(Path(path))
    image, model = _configs(payload, str(path))
    return MetaModel(_encoder(payload["encoder"], image, model, str(path)), image, model,
                     int(payload["round"]), str(payload.get("federation", "")))


def evaluate_site(meta: MetaModel, data: DataConfig, fewshot: FewShotConfig, *, seed: int = 0,
                  finetune: FinetuneMode = "head", device: torch.device | None = None
                  ) -> FewShotResult:
    """Few-shot accuracy at a site: seeded episodes with disjoint support and query sets."""
    site = load_site(data, meta.image)
    return evaluate_fewshot(meta.encoder, site.images, site.labels, len(site.classes), fewshot,
                            seed=seed, device=device or torch.device("cpu"), finetune=finetune,
                            scale=meta.model.cosine_scale)


def adapt(meta: MetaModel, site: SiteData, *, finetune_steps: int = 0,
          finetune: FinetuneMode = "head", device: torch.device | None = None) -> AdaptedModel:
    """A classifier for the site's classes from all its labelled images.

    Prototypes of the labelled images initialise a cosine head; with
    ``finetune_steps`` the head (or the encoder too) is then trained on them.
    """
    device = device or torch.device("cpu")
    present = np.unique(site.labels)
    if len(present) < 2:
        raise ConfigError(source="adaptation data", field="classes",
                          expected="labelled images of at least 2 classes",
                          found=f"{len(present)} class(es) with images")
    labels = torch.from_numpy(site.labels).to(device)
    n_classes = len(site.classes)
    encoder = meta.encoder
    if finetune == "all" and finetune_steps > 0:
        encoder, head = finetune_all(meta.encoder, torch.from_numpy(site.images).to(device),
                                     labels, n_classes, finetune_steps,
                                     meta.model.cosine_scale, device, amp=False)
    else:
        embeddings = embed(meta.encoder, site.images, device)
        with torch.enable_grad():
            head = fit_head(embeddings, labels, n_classes, finetune_steps,
                            meta.model.cosine_scale)
    counts = {c: int(n) for c, n in zip(site.classes, np.bincount(site.labels, minlength=n_classes),
                                        strict=True)}
    info = {"classes": list(site.classes), "images_per_class": counts,
            "finetune_steps": finetune_steps, "finetune": finetune,
            "meta_model_round": meta.round, "federation": meta.federation}
    return AdaptedModel(encoder.cpu().eval(), head.cpu().eval(), site.classes, meta.image,
                        meta.model, info)


def save_adapted(model: AdaptedModel, folder: Path) -> Path:
    """Write the adapted model (weights + a readable JSON summary) into ``folder``."""
    folder = Path(folder)
    atomic_torch_save(folder / ADAPTED_FILE, {
        "kind": "medmeta-adapted-model", "format": 1,
        "encoder": model.encoder.state_dict(), "head": model.head.weight.detach(),
        "classes": list(model.classes), "image": asdict(model.image),
        "model": asdict(model.model)})
    atomic_write_json(folder / ADAPTED_INFO, {**model.info, "image": asdict(model.image)})
    return folder / ADAPTED_FILE


def read_model_file(path: Path, kind: str, what: str) -> dict[str, Any]:
    """The payload of a saved model of ``kind``; :class:`CheckpointError` naming ``path``."""
    try:
        payload = torch_load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on a bad file
        raise CheckpointError(f"{path}: not a readable model ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise CheckpointError(f"{path}: not {what}")
    return payload


def load_adapted(folder: Path) -> AdaptedModel:
    """Load a model written by :func:`save_adapted`."""
    path = Path(folder) / ADAPTED_FILE if Path(folder).is_dir() else Path(folder)
    if not path.exists():
        raise CheckpointError(f"{folder}: no adapted model (expected {ADAPTED_FILE}; create it "
                              "with `medmeta adapt ... --save DIR`)")
    payload = read_model_file(path, "medmeta-adapted-model", "a medmeta adapted model")
    image, model = _configs(payload, str(path))
    classes = tuple(payload["classes"])
    encoder = _encoder(payload["encoder"], image, model, str(path))
    head = CosineClassifier(encoder.embedding_dim, len(classes), model.cosine_scale)
    head.weight.data.copy_(payload["head"])
    info_path = path.parent / ADAPTED_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return AdaptedModel(encoder, head.eval(), classes, image, model, info)


__all__ = ["AdaptedModel", "MetaModel", "adapt", "evaluate_site", "load_adapted",
           "load_meta_model", "save_adapted"]
