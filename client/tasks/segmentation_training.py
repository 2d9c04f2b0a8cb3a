"""Training pieces of a segmentation site: the per-image loss, Dice, flips, and fine-tuning.

Shared by the segmentation plugin (:mod:`client.tasks.segmentation`, federated rounds
through the one DP-SGD loop) and its adaptation at a new site
(:mod:`client.tasks.segmentation_adapt`); the loss's DP argument is in the plugin's
docstring.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.metrics import compute_dice

from medmeta_common.data.segmentation import SegmentationData
from medmeta_common.models.decoder import Segmenter
from medmeta_common.models.factory import freeze_all_but
from medmeta_common.privacy.dp_sgd import BatchLoss, TaskLoss, train_steps
from medmeta_common.privacy.sampling import Draw, FixedBatchSampler

_DICE = DiceLoss(softmax=True, to_onehot_y=True, include_background=False, reduction="none")


def per_image_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B,)``: pixel-mean cross-entropy + soft Dice of each image against its own mask."""
    ce = F.cross_entropy(logits, masks, reduction="none").mean(dim=(1, 2))
    dice = _DICE(logits, masks[:, None]).flatten(1).mean(dim=1)
    return ce + dice


def dice_per_image(logits: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Foreground Dice of the arg-max prediction, per image (both empty: 1)."""
    classes = logits.shape[1]
    pred = F.one_hot(logits.argmax(dim=1), classes).permute(0, 3, 1, 2)
    truth = F.one_hot(masks, classes).permute(0, 3, 1, 2)
    scores = compute_dice(pred, truth, include_background=False, ignore_empty=False)
    return scores.nan_to_num(1.0).mean(dim=1).cpu().numpy()


def flip_augment(images: torch.Tensor, masks: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal and vertical flips, the same for an image and its mask."""
    for dim in (-1, -2):
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(dim), images)
        masks = torch.where(flip[:, None, None], masks.flip(dim), masks)
    return images, masks


def segmentation_loss(data: SegmentationData, generator: torch.Generator,
                      device: torch.device) -> TaskLoss:
    """The batch loss: flipped rows, summed per-row Dice + cross-entropy."""
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks)

    def loss(trained: torch.nn.Module, draw: Draw) -> BatchLoss:
        batch, target = flip_augment(images[draw.index], masks[draw.index], generator)
        total = per_image_loss(trained(batch.to(device)), target.to(device)).sum()
        return BatchLoss(total, len(draw.index))

    return loss


def segmenter_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam on the decoder and on the encoder parameters that require gradients."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def fit_segmenter(model: Segmenter, data: SegmentationData, *, steps: int, batch_size: int,
                  lr: float, seed: int, device: torch.device,
                  encoder_part: Literal["none", "film", "all"] = "all") -> float:
    """Non-private fine-tuning at a new site: ``steps`` Adam steps; the mean loss.

    The decoder always trains; of the encoder, nothing, its FiLM parameters, or all.
    """
    flags = [p.requires_grad for p in model.encoder.parameters()]
    if encoder_part == "none":
        model.encoder.requires_grad_(False)
    else:
        freeze_all_but(model.encoder, encoder_part)
    model.to(device).train()
    optimizer = segmenter_optimizer(model, lr)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    stats = train_steps(model, optimizer, FixedBatchSampler(len(data), batch_size, rng),
                        segmentation_loss(data, generator, device), steps=steps, dp=None,
                        device=device, reduction="sum")
    for param, flag in zip(model.encoder.parameters(), flags, strict=True):
        param.requires_grad_(flag)
    return stats.mean_loss
