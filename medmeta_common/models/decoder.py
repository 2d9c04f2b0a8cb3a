"""A site-local U-Net-style decoder on the shared encoder's stages (only the encoder is shared).

From the deepest stage up, each step upsamples by 2 (bilinear, no parameters),
concatenates the encoder's skip features of that resolution and applies a MONAI
convolution block (GroupNorm, non-in-place ReLU: Opacus-compatible, no batch
statistics, so per-image losses stay independent). A 1x1 convolution gives the class
logits at the input resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medmeta_common.models.encoder import Encoder, SharedEncoder, _groups
from medmeta_common.models.factory import seeded


class UNetDecoder(nn.Module):
    """Class logits ``(B, classes, H, W)`` from the encoder's per-stage features."""

    def __init__(self, widths: tuple[int, ...], classes: int, norm_groups: int = 8) -> None:
        from monai.networks.blocks import Convolution  # MONAI's init is slow: load on use

        super().__init__()
        blocks = []
        channels = widths[-1]
        for skip in reversed(widths[:-1]):
            blocks.append(Convolution(
                spatial_dims=2, in_channels=channels + skip, out_channels=skip, kernel_size=3,
                act=("relu", {"inplace": False}),
                norm=("group", {"num_groups": _groups(norm_groups, skip)}), bias=False))
            channels = skip
        self.blocks = nn.ModuleList(blocks)
        self.logits = nn.Conv2d(channels, classes, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``features``: the encoder's stage outputs, highest resolution first."""
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.logits(x)


class Segmenter(nn.Module):
    """The shared encoder with a site-local decoder."""

    def __init__(self, encoder: SharedEncoder, decoder: UNetDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes, H, W)``, at the input's resolution.

        A backbone whose first feature map is already downsampled (EfficientNet-Lite0's
        is at half resolution) has its logits upsampled bilinearly to the input's size.
        """
        logits = self.decoder(self.encoder.features(images))
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                                   align_corners=False)
        return logits


def build_decoder(encoder: SharedEncoder, classes: int, seed: int) -> UNetDecoder:
    """A fresh decoder for ``encoder``'s feature maps, identical for the same seed."""
    return seeded(lambda: decoder_for(encoder, classes), seed)


def decoder_for(encoder: SharedEncoder, classes: int) -> UNetDecoder:
    """A decoder (random weights) that reads ``encoder``'s feature maps."""
    groups = encoder.spec.norm_groups if isinstance(encoder, Encoder) else 8
    return UNetDecoder(encoder.skip_spec.channels, classes, groups)
