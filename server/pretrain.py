"""A data-free prior: EfficientNet-Lite0 pretrained on procedurally generated images.

For consortia whose policy forbids public weights, ``medmeta pretrain --synthetic``
trains the backbone at the operator on images from random processes only — no real
image, public or private (DP-RandP, Tang et al. 2023; "Learning to see by looking at
noise", Baradad et al. 2021). The images follow the dead-leaves model (Lee, Mumford &
Huang 2001; Baradad et al.'s best-transferring family): occluding shapes whose sizes
follow a power law, with textured fills. Each of ``classes`` *styles* fixes a shape
mix, a palette, a size exponent and a texture frequency; the network learns to tell
styles apart from random instances (supervised on the styles, with flips and crops),
which needs edges, colour, texture and shape — the low-level features that transfer.

BatchNorm trains with batch statistics here (nothing private is involved), and the
running statistics are then frozen into the prior, as the ImageNet ones are. The
weights file is named by its SHA-256 everywhere after (``model.weights: FILE``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medmeta_common.checkpoint import atomic_torch_save, atomic_write_json
from medmeta_common.models.efficientnet import EfficientNetLite0, FrozenBatchNorm
from medmeta_common.models.prior import file_sha256

log = logging.getLogger(__name__)

SHAPES = ("disc", "square", "triangle", "stripe")


@dataclass(frozen=True)
class PretrainSettings:
    """How the synthetic prior is made (recorded next to the weights)."""

    steps: int = 3000
    images: int = 20000
    classes: int = 100
    size: int = 64
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class Style:
    """One class of images: the random process an instance is drawn from."""

    shape_weights: np.ndarray
    palette: np.ndarray
    colour_spread: float
    size_exponent: float
    texture: float
    shapes: int


def random_style(rng: np.random.Generator) -> Style:
    """A style drawn at random (the classes are random too)."""
    return Style(shape_weights=rng.dirichlet(np.full(len(SHAPES), 0.5)),
                 palette=rng.random((3, 3)), colour_spread=float(rng.uniform(0.02, 0.25)),
                 size_exponent=float(rng.uniform(1.5, 3.5)), texture=float(rng.uniform(0, 8)),
                 shapes=int(rng.integers(20, 80)))


def dead_leaves(style: Style, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``(3, size, size)`` image in [0, 1]: occluding textured shapes of ``style``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.broadcast_to(style.palette[0][:, None, None], (3, size, size)).copy()
    for _ in range(style.shapes):
        kind = SHAPES[rng.choice(len(SHAPES), p=style.shape_weights)]
        # Radii from a power law between 2% and 40% of the side.
        u = rng.random()
        low, high, a = 0.02, 0.4, style.size_exponent
        radius = (low ** (1 - a) + u * (high ** (1 - a) - low ** (1 - a))) ** (1 / (1 - a))
        cx, cy, angle = rng.random(), rng.random(), rng.uniform(0, math.pi)
        dx, dy = x - cx, y - cy
        rx = dx * math.cos(angle) + dy * math.sin(angle)
        ry = -dx * math.sin(angle) + dy * math.cos(angle)
        if kind == "disc":
            mask = rx ** 2 + ry ** 2 < radius ** 2
        elif kind == "square":
            mask = (np.abs(rx) < radius) & (np.abs(ry) < radius)
        elif kind == "triangle":
            mask = (ry > -radius / 2) & (ry < radius - 1.7 * np.abs(rx))
        else:
            mask = (np.abs(ry) < radius / 4) & (np.abs(rx) < radius * 2)
        colour = style.palette[rng.integers(3)] + rng.normal(0, style.colour_spread, 3)
        wave = 0.5 + 0.5 * np.sin(style.texture * 2 * math.pi * (rx + 0.3 * ry) / max(radius, 1e-3)
                                  + rng.uniform(0, 2 * math.pi))
        fill = colour[:, None, None] * (0.75 + 0.25 * wave)[None]
        image = np.where(mask[None], fill, image)
    return np.asarray(np.clip(image, 0, 1), dtype=np.float32)


def synthetic_set(settings: PretrainSettings) -> tuple[np.ndarray, np.ndarray]:
    """``images`` dead-leaves images of ``classes`` random styles, and their style labels."""
    rng = np.random.default_rng(settings.seed)
    styles = [random_style(rng) for _ in range(settings.classes)]
    labels = np.arange(settings.images) % settings.classes
    images = np.stack([dead_leaves(styles[c], settings.size, rng) for c in labels])
    return images, labels.astype(np.int64)


def with_batch_statistics(model: EfficientNetLite0) -> list[tuple[FrozenBatchNorm, nn.BatchNorm2d]]:
    """Swap every frozen BatchNorm for a training one (same parameters); the pairs."""
    pairs = []
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FrozenBatchNorm):
                bn = nn.BatchNorm2d(child.film.weight.numel(), eps=child.stats.eps, momentum=0.01)
                setattr(module, name, bn)
                pairs.append((child, bn))
    return pairs


def freeze_statistics(model: EfficientNetLite0,
                      pairs: list[tuple[FrozenBatchNorm, nn.BatchNorm2d]]) -> None:
    """Put the frozen BatchNorm modules back, holding what training learned."""
    swapped = {id(bn): frozen for frozen, bn in pairs}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if id(child) in swapped and isinstance(child, nn.BatchNorm2d):
                frozen = swapped[id(child)]
                mean, var = frozen.stats.running_mean, frozen.stats.running_var
                assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)
                assert child.running_mean is not None and child.running_var is not None
                with torch.no_grad():
                    mean.copy_(child.running_mean)
                    var.copy_(child.running_var)
                    frozen.film.weight.copy_(child.weight)
                    frozen.film.bias.copy_(child.bias)
                setattr(module, name, frozen)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and crops resized back (per image)."""
    n = batch.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    scale = 0.6 + 0.4 * torch.rand(n, generator=generator)
    shift = (1 - scale)[:, None] * (torch.rand(n, 2, generator=generator) * 2 - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale, scale, shift
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, align_corners=False)


def pretrain(settings: PretrainSettings, out: Path) -> str:
    """Train the synthetic prior and write it to ``out`` atomically; its SHA-256."""
    torch.manual_seed(settings.seed)
    started = time.monotonic()
    images, labels = synthetic_set(settings)
    log.info("generated %d synthetic images of %d styles in %.0f s", len(images),
             settings.classes, time.monotonic() - started)
    model = EfficientNetLite0()
    pairs = with_batch_statistics(model)
    head = nn.Linear(model.embedding_dim, settings.classes)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=4e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr,
                                                   total_steps=settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed + 1)
    model.train()
    for step in range(1, settings.steps + 1):
        index = rng.integers(0, len(images), settings.batch_size)
        batch = augment(torch.from_numpy(images[index]), generator)
        loss = F.cross_entropy(head(model(batch)), torch.from_numpy(labels[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, settings.steps // 20) == 0 or step == settings.steps:
            log.info("pretrain step %d/%d: loss %.3f (%.0f s)", step, settings.steps,
                     loss.item(), time.monotonic() - started)
    freeze_statistics(model, pairs)
    atomic_torch_save(out, model.state_dict())
    sha = file_sha256(out)
    atomic_write_json(out.with_suffix(".json"), {
        "kind": "medmeta-synthetic-prior", "sha256": sha, "backbone": "efficientnet_lite0",
        "settings": asdict(settings), "seconds": round(time.monotonic() - started, 1)})
    return sha
