"""Segmentation at a site: a per-image Dice + cross-entropy loss, (DP-)training, few-shot Dice.

Privacy argument: the loss of a batch is the *sum of per-image terms*, each the
pixel-mean cross-entropy plus the soft Dice loss (MONAI ``DiceLoss``, foreground only,
computed per image: ``batch=False``) of one image against its own mask. The encoder
and decoder use GroupNorm only, so no term depends on another image; removing an
image removes exactly one term, and Opacus' per-sample clipping and noise give
record-level DP-SGD as for classification (``tests/test_segmentation.py`` checks the
per-sample gradients against a one-image oracle).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.metrics import compute_dice

from client.fewshot import mean_ci95
from client.train import DPSettings, make_private
from medmeta_common.data.segmentation import SegmentationData
from medmeta_common.models.decoder import Segmenter, build_decoder
from medmeta_common.models.encoder import Encoder

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


def train_segmenter(model: Segmenter, data: SegmentationData, *, steps: int, batch_size: int,
                    lr: float, seed: int, device: torch.device, dp: DPSettings | None = None,
                    train_encoder: bool = True) -> float:
    """``steps`` of (DP-)SGD on the per-image loss; the mean loss (only meaningful without DP).

    Without DP every step uses ``batch_size`` images drawn at random (all of them when
    there are fewer, as in few-shot adaptation). Under DP, images are Poisson-sampled at
    rate ``dp.sample_rate`` from fresh OS entropy and Opacus clips and noises.
    """
    for p in model.encoder.parameters():
        p.requires_grad_(train_encoder)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr)
    trained: torch.nn.Module = model
    rng = np.random.default_rng(secrets.randbits(128) if dp is not None else seed)
    generator = torch.Generator().manual_seed(seed)
    if dp is not None:
        trained, optimizer = make_private(
            model, optimizer, dp, max(1, round(dp.sample_rate * len(data.masks))), device)
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks)
    losses = []
    for _ in range(steps):
        if dp is not None:
            index = np.flatnonzero(rng.random(len(masks)) < dp.sample_rate)
        else:
            index = rng.permutation(len(masks))[:batch_size]
        batch, target = flip_augment(images[index], masks[index], generator)
        optimizer.zero_grad(set_to_none=True)
        loss = per_image_loss(trained(batch.to(device)), target.to(device)).sum()
        if dp is not None or len(index):
            loss.backward()  # under DP an empty batch still takes the noise-only step
            optimizer.step()
        if len(index):
            losses.append(float(loss.detach()) / len(index))
    if dp is not None:
        trained._close()  # remove Opacus hooks; ``model`` keeps the trained weights
    for p in model.encoder.parameters():
        p.requires_grad_(True)
    return float(np.mean(losses)) if losses else math.nan


@dataclass(frozen=True)
class DiceResult:
    """Few-shot segmentation quality over episodes."""

    dice_mean: float
    dice_ci95: float
    shots: int
    episodes: int
    # The same over query images that have foreground only (an empty image segmented as
    # empty scores 1 above, which flatters sets with many background-only slices).
    foreground_dice_mean: float = math.nan
    foreground_dice_ci95: float = math.nan


def evaluate_fewshot_segmentation(encoder: Encoder, data: SegmentationData, *, shots: int,
                                  queries: int = 10, episodes: int = 20, steps: int = 100,
                                  lr: float = 1e-3, finetune: str = "decoder", seed: int = 0,
                                  device: torch.device | None = None) -> DiceResult:
    """Mean Dice on query images after adapting a fresh decoder on ``shots`` support images.

    Each episode draws disjoint support and query images (seeded), trains a new decoder
    (and, with ``finetune="all"``, a copy of the encoder) on the support images only,
    and scores the queries. The interval is 1.96 standard errors over episodes.
    """
    device = device or torch.device("cpu")
    if shots + 1 > len(data.masks):
        raise ValueError(f"{shots} support images need at least {shots + 1} images, "
                         f"the site has {len(data.masks)}")
    rng = np.random.default_rng(seed)
    scores, foreground_scores = [], []
    initial = {k: v.clone() for k, v in encoder.state_dict().items()}
    for episode in range(episodes):
        order = rng.permutation(len(data.masks))
        support = data.subset(order[:shots])
        query = data.subset(order[shots:shots + queries])
        encoder.load_state_dict(initial)
        model = Segmenter(encoder, build_decoder(encoder, len(data.classes), seed + episode))
        train_segmenter(model, support, steps=steps, batch_size=shots, lr=lr,
                        seed=seed + episode, device=device, train_encoder=finetune == "all")
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(query.images).to(device))
        dice = dice_per_image(logits, torch.from_numpy(query.masks).to(device))
        scores.append(float(dice.mean()))
        has_foreground = query.masks.reshape(len(query.masks), -1).any(axis=1)
        if has_foreground.any():
            foreground_scores.append(float(dice[has_foreground].mean()))
    encoder.load_state_dict(initial)
    mean, ci = mean_ci95(scores)
    foreground_mean, foreground_ci = mean_ci95(foreground_scores)
    return DiceResult(mean, ci, shots, len(scores), foreground_mean, foreground_ci)

