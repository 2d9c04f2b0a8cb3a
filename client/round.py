"""The one site round, for every task: train locally under DP, or evaluate.

:mod:`client.app` wraps these in Flower's ClientApp. The skeleton owns what must be
the same for every task — the round's settings from the server's message, seeds,
the DP warning, the budget guard and ledger (:mod:`medmeta_common.privacy.budget`),
the DP-SGD loop and its sampler (:mod:`medmeta_common.privacy.dp_sgd`), and the
metrics of the reply — and asks the site's task plugin (:mod:`client.tasks`) for its
data, local parts, loss and metric.

The numbers of training and validation records and the validation metric are
released outside the DP guarantee, which covers the encoder updates.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import numpy as np
import torch

from client.settings import RoundSettings, SiteRuntime, site_seed
from client.site import site_splits
from client.tasks import get_task
from client.tasks.base import Task, TaskData
from medmeta_common.config import TrainConfig
from medmeta_common.device import pick_device
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.privacy.budget import RoundBudget, guarded_round
from medmeta_common.privacy.dp_sgd import DPSettings, StepStats, load_dp_library, train_steps
from medmeta_common.protocol import NUM_EXAMPLES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    """A round's result at a site: the trained encoder (``None`` if refused) and metrics."""

    encoder: SharedEncoder | None
    metrics: dict[str, float | int]


def freeze_unreachable(encoder: SharedEncoder, task: Task) -> None:
    """Freeze the parameters no gradient of ``task`` reaches (stages past its pooled ones)."""
    unused = set(task.unreachable(encoder))
    for name, param in encoder.named_parameters():
        if name in unused:
            param.requires_grad_(False)


def prepare_round(site: SiteRuntime, settings: RoundSettings, *, train: bool) -> None:
    """Load what a message needs before its compute (its start-up, :mod:`client.startup`).

    The site's data and, to train under DP, the DP library.
    """
    site_splits(site, settings.image, settings.seed)
    if train and site.privacy.enabled:
        load_dp_library()


def train_round(site: SiteRuntime, settings: RoundSettings, encoder: SharedEncoder) -> TrainOutcome:
    """Train the global ``encoder`` locally for one round (DP unless the site turned it off)."""
    started = time.monotonic()
    torch.set_num_threads(site.threads)
    task = get_task(site.task)
    private = site.privacy.enabled
    task.check_settings(settings, private=private)
    data = site_splits(site, settings.image, settings.seed).train
    freeze_unreachable(encoder, task)
    model = task.site_model(site, encoder, data, settings)
    device = pick_device(site.device)  # type: ignore[arg-type]
    seed = site_seed(site.name, settings.seed * 100_003 + settings.server_round)
    plan = task.sampling(data, settings.train)
    units = task.privacy_units(data, site.privacy.unit, source=f"site {site.name}") \
        if private else None
    metrics: dict[str, float | int] = {NUM_EXAMPLES: len(data)}

    def train(dp: DPSettings | None) -> StepStats:
        return local_training(task, model, data, settings.train, dp=dp, seed=seed,
                              device=device, amp=site.amp, units=units)

    if not private:
        log.warning("site %s: training WITHOUT differential privacy (privacy.enabled: false)",
                    site.name)
        stats = train(None)
        metrics.update({"dp": 0, "round-steps": stats.steps, "train-loss": stats.mean_loss})
    else:
        budget = RoundBudget(
            site=site.name, state_dir=site.state_dir, privacy=site.privacy,
            server_round=settings.server_round, steps=settings.train.local_steps,
            planned_steps=(settings.planned_rounds + settings.spare_rounds)
            * settings.train.local_steps,
            units=len(data) if units is None else len(np.unique(units)),
            sample_rate=plan.rate)
        if not guarded_round(budget, lambda dp: train(dp).steps, metrics):
            return TrainOutcome(None, metrics)
    task.save_site_model(site, model, data)
    metrics["refused"] = 0
    metrics["compute-seconds"] = round(time.monotonic() - started, 3)
    return TrainOutcome(encoder, metrics)


def local_training(task: Task, model: torch.nn.Module, data: TaskData, train: TrainConfig, *,
                   dp: DPSettings | None, seed: int, device: torch.device, amp: bool,
                   units: np.ndarray | None) -> StepStats:
    """``train.local_steps`` steps of the task's (DP-)training of ``model`` on ``data``.

    Under DP the sampling (and Opacus' noise) come from fresh OS entropy, never from
    ``seed``: the seed is in the federation's config, and the analysis needs both
    hidden from the server. Non-private runs are reproducible.
    """
    rng = np.random.default_rng(secrets.randbits(128) if dp is not None else seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimizer = task.optimizer(model, train)
    plan = task.sampling(data, train)
    sampler = plan.poisson(len(data), rng, units) if dp is not None else \
        task.nonprivate_sampler(data, train, plan, rng)
    loss = task.loss(model, data, train, generator=generator, device=device, amp=amp)
    stats = train_steps(model, optimizer, sampler, loss, steps=train.local_steps, dp=dp,
                        device=device, reduction=task.reduction)
    task.after_training(model)
    return stats


def evaluate_round(site: SiteRuntime, settings: RoundSettings,
                   encoder: SharedEncoder) -> dict[str, float | int]:
    """The task's validation metric of ``encoder`` on the site's validation patients."""
    torch.set_num_threads(site.threads)
    val = site_splits(site, settings.image, settings.seed).val
    return get_task(site.task).evaluate(site, settings, encoder, val,
                                        pick_device(site.device))  # type: ignore[arg-type]
