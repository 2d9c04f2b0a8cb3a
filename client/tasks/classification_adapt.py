"""Classification at a new site: adapt the meta-model to its classes, entirely locally.

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
    FINETUNE_LR,
    FewShotResult,
    FinetuneMode,
    embed,
    evaluate_fewshot,
    finetune_encoder,
    fit_head,
)
from client.meta_model import (
    MetaModel,
    load_meta_model,
    model_settings,
    read_model_file,
    saved_encoder,
)
from client.tasks.base import AdaptDefaults, AdaptRequest
from medmeta_common.checkpoint import atomic_torch_save, atomic_write_json
from medmeta_common.config import DataConfig, FewShotConfig, ImageConfig, ModelConfig
from medmeta_common.config.typed import build
from medmeta_common.data.records import SiteData
from medmeta_common.data.sources import load_site
from medmeta_common.errors import CheckpointError, ConfigError
from medmeta_common.models.heads import CosineClassifier

log = logging.getLogger(__name__)

ADAPTED_FILE = "adapted_model.pt"
ADAPTED_INFO = "adapted_model.json"


@dataclass
class AdaptedModel:
    """A site's classifier: the (possibly fine-tuned) encoder and a cosine head."""

    encoder: torch.nn.Module
    head: CosineClassifier
    classes: tuple[str, ...]
    image: ImageConfig
    model: ModelConfig
    info: dict[str, Any]


def evaluate_site(meta: MetaModel, data: DataConfig, fewshot: FewShotConfig, *, seed: int = 0,
                  finetune: FinetuneMode = "head", device: torch.device | None = None
                  ) -> FewShotResult:
    """Few-shot accuracy at a site: seeded episodes with disjoint support and query sets."""
    site = load_site(data, meta.image)
    return evaluate_fewshot(meta.encoder, site.images, site.labels, len(site.classes), fewshot,
                            seed=seed, device=device or torch.device("cpu"), finetune=finetune,
                            scale=meta.model.cosine_scale)


def adapt(meta: MetaModel, site: SiteData, *, finetune_steps: int = 0,
          finetune: FinetuneMode = "head", device: torch.device | None = None,
          lr: float | None = None) -> AdaptedModel:
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
    encoder: torch.nn.Module = meta.encoder
    rate = lr or FINETUNE_LR[finetune]
    if finetune != "head" and finetune_steps > 0:
        encoder, head = finetune_encoder(meta.encoder, torch.from_numpy(site.images).to(device),
                                         labels, n_classes, finetune_steps,
                                         meta.model.cosine_scale, device, amp=False, lr=rate,
                                         part=finetune)
    else:
        embeddings = embed(meta.encoder, site.images, device)
        with torch.enable_grad():
            head = fit_head(embeddings, labels, n_classes, finetune_steps,
                            meta.model.cosine_scale, lr=rate)
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


def load_adapted(folder: Path) -> AdaptedModel:
    """Load a model written by :func:`save_adapted`."""
    path = Path(folder) / ADAPTED_FILE if Path(folder).is_dir() else Path(folder)
    if not path.exists():
        raise CheckpointError(f"{folder}: no adapted model (expected {ADAPTED_FILE}; create it "
                              "with `medmeta adapt ... --save DIR`)")
    payload = read_model_file(path, "medmeta-adapted-model", "a medmeta adapted model")
    image, model = model_settings(payload, str(path))
    classes = tuple(payload["classes"])
    encoder = saved_encoder(payload["encoder"], image, model, str(path))
    head = CosineClassifier(encoder.embedding_dim, len(classes), model.cosine_scale)
    head.weight.data.copy_(payload["head"])
    info_path = path.parent / ADAPTED_INFO
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return AdaptedModel(encoder, head.eval(), classes, image, model, info)


def adapt_command(request: AdaptRequest, defaults: AdaptDefaults
                  ) -> tuple[dict[str, Any], str]:
    """``medmeta adapt`` for classification: the ``--json`` report and a summary line."""
    if request.ways is None:
        raise ConfigError(source="--ways", field="ways", expected="the number of classes per "
                          "episode (required for classification)", found="nothing")
    meta = load_meta_model(request.checkpoint)
    defaults = defaults.for_backbone(meta.model.backbone)
    steps = defaults.steps_for(request.shots, request.finetune_steps)
    mode = request.finetune or defaults.finetune
    fewshot = build(FewShotConfig, {"ways": request.ways, "shots": request.shots,
                                    "queries": request.queries,
                                    "episodes": request.episodes or defaults.episodes,
                                    "finetune_steps": steps,
                                    "finetune_lr": defaults.finetune_lr}, source="command line")
    result = evaluate_site(meta, request.data, fewshot, seed=request.seed,
                           finetune=mode)
    if request.save is not None:
        adapted = adapt(meta, load_site(request.data, meta.image), finetune_steps=steps,
                        finetune=mode, lr=defaults.finetune_lr)
        path = save_adapted(adapted, request.save)
        log.info("adapted model for classes %s written to %s", list(adapted.classes), path)
    summary = (f"{result.ways}-way {result.shots}-shot accuracy: "
               f"{100 * result.accuracy_mean:.1f}% ± {100 * result.accuracy_ci95:.1f} "
               f"(95% interval over {result.episodes} episodes; meta-model of round "
               f"{meta.round})")
    return result.to_json(), summary
