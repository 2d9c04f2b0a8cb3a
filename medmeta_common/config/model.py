"""``model``: the shared encoder's architecture and the scale of the site heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medmeta_common.config.typed import check


@dataclass(frozen=True)
class ModelConfig:
    """The shared encoder's architecture, and the scale of the site heads.

    Attributes
    ----------
    preset : {"small", "large"}
        ``small`` (~0.13 M parameters) trains at useful speed on 2 CPU cores; ``large``
        (~4.7 M) is for GPU sites.
    widths : list of int, optional
        Channels of each stage, overriding the preset.
    convs_per_stage : int, optional
        Convolutions per stage, overriding the preset.
    norm_groups : int
        GroupNorm groups (BatchNorm is never used: it breaks DP-SGD).
    weight_standardization : bool
        Standardise every convolution's filters (helps DP-SGD with GroupNorm).
    cosine_scale : float
        Inverse temperature of the cosine classifier and prototype logits.

    """

    preset: Literal["small", "large"] = "small"
    widths: tuple[int, ...] | None = None
    convs_per_stage: int | None = None
    norm_groups: int = 8
    weight_standardization: bool = True
    cosine_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.widths is not None:
            check(0 < len(self.widths) <= 6 and all(w > 0 for w in self.widths),
                  field="widths", expected="1 to 6 positive integers", found=list(self.widths))
        if self.convs_per_stage is not None:
            check(1 <= self.convs_per_stage <= 4, field="convs_per_stage",
                  expected="an integer in [1, 4]", found=self.convs_per_stage)
        check(self.cosine_scale > 0, field="cosine_scale", expected="a positive number",
              found=self.cosine_scale)
