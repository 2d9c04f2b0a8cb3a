"""Training pieces of a segmentation site: the per-image loss, Dice, flips, and fine-tuning.

Shared by the segmentation plugin (:mod:`client.tasks.segmentation`, federated rounds
through the one DP-SGD loop) and its adaptation at a new site
(:mod:`client.tasks.segmentation_adapt`); the loss's DP argument is in the plugin's
docstring.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.metrics import compute_dice

from client.tasks.finetuning import EncoderPart, finetune
from medmeta_common.data.segmentation import SegmentationData
from medmeta_common.models.decoder import Segmenter
from medmeta_common.privacy.dp_sgd import BatchLoss, TaskLoss
from medmeta_common.privacy.sampling import Draw

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


def fit_segmenter(model: Segmenter, data: SegmentationData, *, steps: int, batch_size: int,
                  lr: float, seed: int, device: torch.device,
                  encoder_part: EncoderPart = "all") -> float:
    """Non-private fine-tuning at a new site (the decoder, and ``encoder_part``); the mean loss."""
    return finetune(model, model.encoder, lambda g: segmentation_loss(data, g, device),
                    rows=len(data), steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                    device=device, encoder_part=encoder_part)
