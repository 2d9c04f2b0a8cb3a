"""Non-private fine-tuning at a new site, for every task with a site-local part.

``medmeta adapt`` trains a fresh head or decoder (and optionally part of the encoder)
on the site's own few annotated images. It is local and non-private (nothing leaves
the site), seeded and reproducible, and goes through the one training loop,
:func:`medmeta_common.privacy.dp_sgd.train_steps`, with ``dp=None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from medmeta_common.models.factory import freeze_all_but
from medmeta_common.privacy.dp_sgd import TaskLoss, train_steps
from medmeta_common.privacy.sampling import FixedBatchSampler

EncoderPart = Literal["none", "film", "all"]


def adam_on_trainable(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam on the parameters of ``model`` that require gradients."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def finetune(model: torch.nn.Module, encoder: torch.nn.Module,
             loss_of: Callable[[torch.Generator], TaskLoss], *, rows: int, steps: int,
             batch_size: int, lr: float, seed: int, device: torch.device,
             encoder_part: EncoderPart) -> float:
    """``steps`` Adam steps of ``model`` on ``rows`` rows; the mean loss.

    The site-local part always trains; of ``encoder`` (a part of ``model``), nothing,
    its FiLM parameters, or all. ``loss_of(generator)`` is the task's batch loss with
    its augmentation drawn from ``generator``. The encoder's trainable flags are
    restored afterwards.
    """
    flags = [p.requires_grad for p in encoder.parameters()]
    if encoder_part == "none":
        encoder.requires_grad_(False)
    else:
        freeze_all_but(encoder, encoder_part)
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    stats = train_steps(model, adam_on_trainable(model, lr),
                        FixedBatchSampler(rows, batch_size, np.random.default_rng(seed)),
                        loss_of(generator), steps=steps, dp=None, device=device,
                        reduction="sum")
    for param, flag in zip(encoder.parameters(), flags, strict=True):
        param.requires_grad_(flag)
    return stats.mean_loss
