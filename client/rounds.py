"""One round at a site, without any transport: train locally under DP, or evaluate.

:mod:`client.app` wraps these in Flower's ClientApp; benchmarks call them directly.

The numbers of training and validation records and the validation accuracy are
released outside the DP guarantee, which covers the encoder updates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from client.fewshot import evaluate_fewshot
from client.site import (
    SiteRuntime,
    load_head,
    load_rotation_head,
    save_head,
    save_rotation_head,
    site_seed,
    site_splits,
)
from client.train import DPSettings, sample_rate_for, train_cosine, train_protonet
from medmeta_common.config import FewShotConfig, ImageConfig, ModelConfig, TrainConfig
from medmeta_common.device import pick_device
from medmeta_common.episodes import classes_with_at_least
from medmeta_common.models.encoder import Encoder
from medmeta_common.models.heads import EncoderWithHead
from medmeta_common.privacy.accounting import calibrate_noise, default_delta
from medmeta_common.privacy.ledger import PrivacyLedger, ledger_lock
from medmeta_common.protocol import NUM_EXAMPLES, rebuild
from medmeta_common.update_codec import ENCODINGS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundSettings:
    """What the server asks of this round, rebuilt and validated from its message."""

    image: ImageConfig
    model: ModelConfig
    train: TrainConfig
    evaluation: FewShotConfig
    planned_rounds: int
    server_round: int
    seed: int
    update_encoding: str = "float32"


def read_settings(config: Mapping[str, Any]) -> RoundSettings:
    """Rebuild the round's settings from the server's flat config entries."""
    return RoundSettings(
        image=rebuild(ImageConfig, config, "image"),
        model=rebuild(ModelConfig, config, "model"),
        train=rebuild(TrainConfig, config, "train"),
        evaluation=rebuild(FewShotConfig, config, "evaluation"),
        planned_rounds=int(config.get("planned-rounds", 1)),
        server_round=int(config.get("server-round", 0)),
        seed=int(config.get("seed", 0)),
        update_encoding=_update_encoding(config),
    )


def _update_encoding(config: Mapping[str, Any]) -> str:
    encoding = str(config.get("update-encoding", "float32"))
    if encoding not in ENCODINGS:
        raise ValueError(f"the server asked for update encoding {encoding!r}; this site "
                         f"supports {', '.join(ENCODINGS)}")
    return encoding


@dataclass(frozen=True)
class TrainOutcome:
    """A round's result at a site: the trained encoder (``None`` if refused) and metrics."""

    encoder: Encoder | None
    metrics: dict[str, float | int]


def train_round(site: SiteRuntime, settings: RoundSettings, encoder: Encoder) -> TrainOutcome:
    """Train the global ``encoder`` locally for one round (DP unless the site turned it off)."""
    if site.task == "segmentation":
        from client.segmentation_rounds import train_segmentation_round

        return train_segmentation_round(site, settings, encoder)
    started = time.monotonic()
    torch.set_num_threads(site.threads)
    data = site_splits(site, settings.image, settings.seed).train
    head = load_head(site, data.classes, encoder.embedding_dim, settings.model.cosine_scale,
                     settings.seed)
    head.weight.requires_grad_(settings.train.head == "train")
    rotation = None
    if settings.train.rotation_weight > 0:
        rotation = load_rotation_head(site, encoder.embedding_dim, settings.seed)
    model = EncoderWithHead(encoder, head, rotation)
    device = pick_device(site.device)  # type: ignore[arg-type]
    round_seed = site_seed(site.name, settings.seed * 100_003 + settings.server_round)
    metrics: dict[str, float | int] = {NUM_EXAMPLES: len(data)}

    if not site.privacy.enabled:
        log.warning("site %s: training WITHOUT differential privacy (privacy.enabled: false)",
                    site.name)
        if settings.train.loss == "protonet":
            stats = train_protonet(model, data, settings.train, seed=round_seed, device=device,
                                   amp=site.amp)
        else:
            rate = sample_rate_for(settings.train, len(data), len(data.classes))
            stats = train_cosine(model, data, settings.train, dp=None, sample_rate=rate,
                                 seed=round_seed, device=device, amp=site.amp)
        metrics.update({"dp": 0, "round-steps": stats.steps, "train-loss": stats.mean_loss})
    else:
        if settings.train.loss != "cosine":
            raise ValueError("the server asked for the non-private 'protonet' loss; this site "
                             "trains under DP and only accepts the per-record 'cosine' loss")
        rate = sample_rate_for(settings.train, len(data), len(data.classes))
        units = len(data) if site.privacy.unit == "image" else len(np.unique(data.groups))

        def run(dp: DPSettings) -> int:
            return train_cosine(model, data, settings.train, dp=dp, sample_rate=rate,
                                seed=round_seed, device=device, amp=site.amp).steps

        if not private_round(site, settings, units=units, rate=rate, train=run,
                             metrics=metrics):
            return TrainOutcome(None, metrics)
    save_head(site, head, data.classes)
    if rotation is not None:
        save_rotation_head(site, rotation)
    metrics["refused"] = 0
    metrics["compute-seconds"] = round(time.monotonic() - started, 3)
    return TrainOutcome(model.encoder, metrics)


def private_round(site: SiteRuntime, settings: RoundSettings, *, units: int, rate: float,
                  train: Callable[[DPSettings], int], metrics: dict[str, float | int]) -> bool:
    """Run ``train`` under the site's ledger; ``False`` (metrics say so) if over budget.

    Calibrates the noise once for the planned rounds, refuses a round that would exceed
    the budget, and records the spend on disk before the update can leave the site.
    ``train`` gets the DP settings and returns the steps it took.
    """
    delta = site.privacy.delta or default_delta(units)
    steps = settings.train.local_steps
    with ledger_lock(site.state_dir):
        ledger = PrivacyLedger.open(site.state_dir, site=site.name, delta=delta,
                                    epsilon_budget=site.privacy.epsilon, unit=site.privacy.unit)
        sigma = site.privacy.noise_multiplier or ledger.calibrated_noise
        if sigma is None:
            sigma = calibrate_noise(epsilon=site.privacy.epsilon, delta=delta,
                                    sample_rate=rate, steps=settings.planned_rounds * steps)
            ledger.calibrated_noise = sigma
            ledger.save()
        metrics.update({"dp": 1, "delta": delta, "noise-multiplier": sigma, "sample-rate": rate})
        after = ledger.epsilon_after(sigma, rate, steps)
        if after > site.privacy.epsilon:
            log.warning("site %s: refusing round %d: epsilon would reach %.3f, above the "
                        "budget %.3f", site.name, settings.server_round, after,
                        site.privacy.epsilon)
            metrics.update({NUM_EXAMPLES: 0, "refused": 1, "epsilon": ledger.epsilon,
                            "steps": ledger.steps})
            return False
        taken = train(DPSettings(sigma, rate, site.privacy.max_grad_norm, site.privacy.unit))
        # The spend is on disk before the update leaves the site.
        epsilon = ledger.record(settings.server_round, sigma, rate, taken,
                                site.privacy.max_grad_norm)
        metrics.update({"epsilon": epsilon, "steps": ledger.steps, "round-steps": taken})
    return True


def evaluate_round(site: SiteRuntime, settings: RoundSettings,
                   encoder: Encoder) -> dict[str, float | int]:
    """Few-shot metrics of ``encoder`` on the site's validation patients."""
    if site.task == "segmentation":
        from client.segmentation_rounds import evaluate_segmentation_round

        return evaluate_segmentation_round(site, settings, encoder)
    torch.set_num_threads(site.threads)
    val = site_splits(site, settings.image, settings.seed).val
    fewshot = _fit_episode_shape(settings.evaluation, val.labels, len(val.classes))
    metrics: dict[str, float | int] = {NUM_EXAMPLES: len(val)}
    if fewshot is None:
        log.warning("site %s: validation split too small for few-shot evaluation", site.name)
        metrics["episodes"] = 0
    else:
        result = evaluate_fewshot(encoder, val.images, val.labels, len(val.classes), fewshot,
                                  seed=settings.seed + settings.server_round,
                                  device=pick_device(site.device),  # type: ignore[arg-type]
                                  scale=settings.model.cosine_scale)
        metrics.update({"accuracy": result.accuracy_mean, "accuracy-ci95": result.accuracy_ci95,
                        "episodes": result.episodes, "ways": result.ways})
    return metrics


def _fit_episode_shape(fewshot: FewShotConfig, labels: np.ndarray,
                       n_classes: int) -> FewShotConfig | None:
    """Shrink ways/queries to what a small validation split can hold (or give up)."""
    queries = fewshot.queries
    while queries >= 1:
        eligible = len(classes_with_at_least(labels, n_classes, fewshot.shots + queries))
        if eligible >= 2:
            return FewShotConfig(ways=min(fewshot.ways, eligible), shots=fewshot.shots,
                                 queries=queries, episodes=fewshot.episodes)
        queries //= 2
    return None


