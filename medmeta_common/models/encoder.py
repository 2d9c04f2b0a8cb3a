"""The shared image encoder: a DP-compatible convolutional network built from MONAI blocks.

DP-SGD needs every layer's per-sample gradient to depend on that sample alone, so the
encoder uses GroupNorm (never BatchNorm) and non-in-place ReLU (Opacus' hooks need
the activation inputs intact). Each stage is ``convs_per_stage`` MONAI
``Convolution`` blocks (conv 3x3 -> GroupNorm -> ReLU) and stages after the first
start with a 2x2 max-pool, so stage outputs are at full, 1/2, 1/4... resolution
(the skip connections a segmentation decoder needs). The embedding is the spatial
mean of the last stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder (stored in every checkpoint)."""

    in_channels: int
    widths: tuple[int, ...]
    convs_per_stage: int
    norm_groups: int
    weight_standardization: bool = False

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding vector."""
        return self.widths[-1]


PRESETS: dict[str, tuple[tuple[int, ...], int]] = {
    # ~0.15 M parameters: fast on 2 CPU cores, and few parameters suit DP-SGD.
    "small": ((32, 64, 64, 128), 1),
    # ~4.7 M parameters, two convolutions per stage: for GPU sites.
    "large": ((64, 128, 256, 512), 2),
}


@dataclass(frozen=True)
class StageSpec:
    """The feature maps a backbone's ``features`` returns: channels and strides."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]


class SharedEncoder(nn.Module):
    """What every backbone of the shared encoder offers.

    ``forward(images)`` gives ``(B, embedding_dim)`` embeddings; ``features(images)``
    the feature maps of :attr:`skip_spec`, highest resolution first (what a
    segmentation decoder reads).
    """

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding vector."""
        raise NotImplementedError

    @property
    def skip_spec(self) -> StageSpec:
        """Channels and strides of the maps :meth:`features` returns."""
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps of :attr:`skip_spec`."""
        raise NotImplementedError

    def unused_by(self, output: str) -> list[str]:
        """Parameters that ``forward`` (``embedding``) or ``features`` never reaches.

        DP-SGD needs a per-sample gradient for every parameter it trains, so a site
        freezes these for its round (they return unchanged).
        """
        return []


class Encoder(SharedEncoder):
    """Convolutional encoder; ``forward`` returns ``(B, embedding_dim)`` embeddings."""

    def __init__(self, spec: EncoderSpec) -> None:
        # MONAI's package init costs ~1.5 s per ClientApp process (it imports its
        # transforms, scipy and matplotlib): only the small CNN pays it.
        from monai.networks.blocks import Convolution

        super().__init__()
        self.spec = spec
        stages: list[nn.Module] = []
        channels = spec.in_channels
        for index, width in enumerate(spec.widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if index > 0 else []
            for _ in range(spec.convs_per_stage):
                block = Convolution(
                    spatial_dims=2,
                    in_channels=channels,
                    out_channels=width,
                    kernel_size=3,
                    act=("relu", {"inplace": False}),
                    norm=("group", {"num_groups": _groups(spec.norm_groups, width)}),
                    bias=False,
                )
                if spec.weight_standardization:
                    assert isinstance(block.conv, nn.Conv2d)
                    block.conv = StandardizedConv2d.from_conv(block.conv)
                layers.append(block)
                channels = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding vector."""
        return self.spec.embedding_dim

    @property
    def skip_spec(self) -> StageSpec:
        """Every stage's output: full resolution, then halved by each max-pool."""
        return StageSpec(self.spec.widths, tuple(2 ** i for i in range(len(self.spec.widths))))

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Output of every stage, highest resolution first."""
        outputs = []
        x = images
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, D)``: the spatial mean of the last stage."""
        x = images
        for stage in self.stages:
            x = stage(x)
        return x.mean(dim=(2, 3))


class StandardizedConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019).

    Each filter is used with zero mean and unit variance. With GroupNorm it helps DP-SGD
    (De et al. 2022). Its per-sample-gradient rule for Opacus is in
    :mod:`medmeta_common.privacy.grad_samplers`.
    """

    eps = 1e-5

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> StandardizedConv2d:
        """A standardised copy of ``conv`` (same shape and initial weights)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                  stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                  dilation=conv.dilation, groups=conv.groups,  # type: ignore[arg-type]
                  bias=conv.bias is not None)
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve with the standardised weights."""
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) / torch.sqrt(var + self.eps), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)


def _groups(wanted: int, channels: int) -> int:
    """The largest group count <= ``wanted`` that divides ``channels``."""
    for groups in range(min(wanted, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1
