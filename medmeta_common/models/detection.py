"""A site-local anchor-free detection head (CenterNet-style) on the shared encoder's stages.

The head reads the encoder's feature maps at strides 4, 8 and 16 (a light FPN: 1x1
projections, upsampled and summed at stride 4, one 3x3 convolution with GroupNorm),
and predicts, per cell of the stride-4 grid, one centre-ness heatmap per class, the
box size (log width and height, in cells) and the sub-cell offset of the centre.
No anchors, so nothing is fitted to a site's boxes; the heatmap bias starts at a
fixed prior (0.1) and decoding keeps local maxima (3x3 max-pool) with a fixed top-k —
no score threshold or NMS tuned on anyone's labels.

Per-image loss (the DP argument of the detection task)
-------------------------------------------------------
:func:`per_image_loss` gives one term per image: the penalty-reduced focal loss of
its heatmap, plus L1 losses of size and offset at its own object centres, each
normalised by *that image's* number of objects (at least 1). Stock CenterNet/FCOS
losses divide by the positives of the whole batch, which makes each image's weight
depend on the others; here nothing does, so the batch loss is a sum of per-image
terms and Opacus' per-sample gradients are exact (``tests/test_detection.py`` checks
that changing another image's boxes leaves an image's per-sample gradient unchanged).
Head and encoder use GroupNorm or frozen BatchNorm statistics only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.models.factory import seeded

HEAD_STRIDES = (4, 8, 16)
HEAD_WIDTH = 64
PRIOR_PROBABILITY = 0.1
# Gaussian radius of an object's centre on the heatmap, as a fraction of its size (TTFNet).
GAUSSIAN_ALPHA = 0.54
MAX_DETECTIONS = 100


class DetectionHead(nn.Module):
    """Heatmap ``(B, C, h, w)``, log-size and offset ``(B, 2, h, w)`` each, at stride 4."""

    def __init__(self, channels: tuple[int, ...], classes: int) -> None:
        from monai.networks.blocks import Convolution  # MONAI's init is slow: load on use

        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, HEAD_WIDTH, kernel_size=1) for c in channels)
        self.fuse = Convolution(spatial_dims=2, in_channels=HEAD_WIDTH, out_channels=HEAD_WIDTH,
                                kernel_size=3, act=("relu", {"inplace": False}),
                                norm=("group", {"num_groups": 8}), bias=False)
        self.heat = nn.Conv2d(HEAD_WIDTH, classes, kernel_size=1)
        self.size = nn.Conv2d(HEAD_WIDTH, 2, kernel_size=1)
        self.offset = nn.Conv2d(HEAD_WIDTH, 2, kernel_size=1)
        prior = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
        self.heat.bias = nn.Parameter(torch.full((classes,), prior))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``(B, C+4, h, w)`` from the selected maps (``features``, highest resolution first)."""
        size = features[0].shape[-2:]
        x = self.lateral[0](features[0])
        for lateral, feature in zip(self.lateral[1:], features[1:], strict=True):
            x = x + F.interpolate(lateral(feature), size=size, mode="bilinear",
                                  align_corners=False)
        x = self.fuse(x)
        return torch.cat([self.heat(x), self.size(x), self.offset(x)], dim=1)


def head_maps(encoder: SharedEncoder) -> list[int]:
    """Which of ``encoder.features`` the head reads: strides 4 to 16 (the nearest there are)."""
    strides = encoder.skip_spec.strides
    chosen = [i for i, s in enumerate(strides) if s in HEAD_STRIDES]
    if not chosen:  # a backbone without these strides: its three middle maps
        middle = len(strides) // 2
        chosen = list(range(max(0, middle - 1), min(len(strides), middle + 2)))
    return chosen


class Detector(nn.Module):
    """The shared encoder with a site-local detection head; ``forward`` gives the raw maps."""

    def __init__(self, encoder: SharedEncoder, head: DetectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.maps = head_maps(encoder)

    def selected_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder maps the head reads (cacheable when the encoder is frozen)."""
        features = self.encoder.features(images)
        return [features[i] for i in self.maps]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, classes + 4, h, w)``: heatmap logits, log-size, offset."""
        return self.head(self.selected_features(images))


def build_head(encoder: SharedEncoder, classes: int, seed: int) -> DetectionHead:
    """A fresh head for ``encoder`` (data-independent), identical for the same seed."""
    channels = tuple(encoder.skip_spec.channels[i] for i in head_maps(encoder))
    return seeded(lambda: DetectionHead(channels, classes), seed)


def unreached_parameters(encoder: SharedEncoder) -> list[str]:
    """Encoder parameters no gradient of the head's maps reaches (data-independent).

    DP-SGD needs a per-sample gradient for every trained parameter, so these are
    frozen for a detection round (e.g. EfficientNet-Lite0's stages past stride 16).
    """
    flags = {name: p.requires_grad for name, p in encoder.named_parameters()}
    encoder.requires_grad_(True)
    grads = {name: p.grad for name, p in encoder.named_parameters()}
    encoder.zero_grad(set_to_none=True)
    probe = torch.zeros(1, encoder_channels(encoder), 32, 32)
    maps = encoder.features(probe)
    sum(maps[i].sum() for i in head_maps(encoder)).backward()  # type: ignore[union-attr]
    unreached = [name for name, p in encoder.named_parameters() if p.grad is None]
    for name, p in encoder.named_parameters():
        p.grad = grads[name]
        p.requires_grad_(flags[name])
    return unreached


def encoder_channels(encoder: SharedEncoder) -> int:
    """The input channels of ``encoder`` (its first convolution's)."""
    first = next(m for m in encoder.modules() if isinstance(m, nn.Conv2d))
    return int(first.in_channels)


@dataclass(frozen=True)
class Targets:
    """Training targets of a batch on its output grid."""

    heat: torch.Tensor      # (B, C, h, w) in [0, 1], 1 at object centres
    rows: torch.Tensor      # (M,) row of each object
    cells: torch.Tensor     # (M, 2) integer cell (y, x) of each centre
    size: torch.Tensor      # (M, 2) log width and height in cells
    offset: torch.Tensor    # (M, 2) sub-cell offset (x, y) of the centre
    counts: torch.Tensor    # (B,) objects per row


def make_targets(boxes: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor, *,
                 batch: int, classes: int, grid: tuple[int, int], stride: float) -> Targets:
    """Heatmap, size and offset targets of boxes ``(M, 4)`` (input pixels) on a ``grid``."""
    h, w = grid
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / stride
    extent = ((boxes[:, 2:] - boxes[:, :2]) / stride).clamp(min=1e-3)
    cell = centre.floor().clamp(min=0)
    cell = torch.stack([cell[:, 0].clamp(max=w - 1), cell[:, 1].clamp(max=h - 1)], dim=1)
    sigma = (GAUSSIAN_ALPHA * extent / 6).clamp(min=0.5)
    device = boxes.device
    ys = torch.arange(h, dtype=torch.float32, device=device)[None, :, None]
    xs = torch.arange(w, dtype=torch.float32, device=device)[None, None, :]
    gauss = torch.exp(-((xs - cell[:, 0, None, None]) ** 2) / (2 * sigma[:, 0, None, None] ** 2)
                      - ((ys - cell[:, 1, None, None]) ** 2) / (2 * sigma[:, 1, None, None] ** 2))
    heat = torch.zeros(batch * classes, h, w, device=device)
    if len(boxes):
        slot = (rows * classes + labels).long()
        heat = heat.scatter_reduce(0, slot[:, None, None].expand_as(gauss), gauss, "amax")
    counts = torch.bincount(rows.long(), minlength=batch)
    return Targets(heat.view(batch, classes, h, w), rows.long(),
                   torch.stack([cell[:, 1], cell[:, 0]], dim=1).long(), extent.log(),
                   centre - cell, counts)


def per_image_loss(output: torch.Tensor, targets: Targets) -> torch.Tensor:
    """``(B,)``: focal heatmap loss + size and offset L1, each normalised within its image."""
    classes = targets.heat.shape[1]
    logits = output[:, :classes]
    prob = logits.sigmoid()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    positive = targets.heat.eq(1).float()
    focal = -(positive * (1 - prob) ** 2 * log_p
              + (1 - positive) * (1 - targets.heat) ** 4 * prob ** 2 * log_not_p)
    per_row = focal.flatten(1).sum(dim=1)
    if len(targets.rows):
        at = output[targets.rows, :, targets.cells[:, 0], targets.cells[:, 1]]  # (M, C+4)
        regression = ((at[:, classes:classes + 2] - targets.size).abs().sum(dim=1)
                      + (at[:, classes + 2:] - targets.offset).abs().sum(dim=1))
        per_row = per_row.index_add(0, targets.rows, regression)
    return per_row / targets.counts.clamp(min=1).to(per_row.dtype)


@dataclass(frozen=True)
class Detections:
    """One image's detections, in input pixels, best first."""

    boxes: np.ndarray   # (D, 4) x_min, y_min, x_max, y_max
    labels: np.ndarray  # (D,) int
    scores: np.ndarray  # (D,) float


def decode(output: torch.Tensor, classes: int, stride: float,
           top_k: int = MAX_DETECTIONS) -> list[Detections]:
    """Boxes of each image: the ``top_k`` local maxima of the heatmaps (no threshold)."""
    heat = output[:, :classes].sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    b, _, h, w = heat.shape
    scores, flat = peaks.flatten(1).topk(min(top_k, classes * h * w), dim=1)
    labels, cell = flat // (h * w), flat % (h * w)
    ys, xs = cell // w, cell % w
    results = []
    for i in range(b):
        offset = output[i, classes + 2:, ys[i], xs[i]]
        extent = output[i, classes:classes + 2, ys[i], xs[i]].clamp(max=8).exp()
        cx, cy = (xs[i] + offset[0]) * stride, (ys[i] + offset[1]) * stride
        bw, bh = extent[0] * stride, extent[1] * stride
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        keep = scores[i] > 0
        results.append(Detections(boxes[keep].detach().cpu().numpy(),
                                  labels[i][keep].cpu().numpy(),
                                  scores[i][keep].detach().cpu().numpy()))
    return results
