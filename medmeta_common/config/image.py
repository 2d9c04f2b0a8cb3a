"""``image``: how every site's images are harmonised before the encoder sees them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medmeta_common.config.typed import check


@dataclass(frozen=True)
class ImageConfig:
    """How every site's images are harmonised before training.

    Attributes
    ----------
    size : int
        Side of the square images the encoder sees.
    channels : {1, 3}
        Grey (1) or RGB (3); sources are converted.
    intensity : {"zscore", "minmax"}
        Per-image, per-channel normalisation.

    """

    size: int = 32
    channels: Literal[1, 3] = 1
    intensity: Literal["zscore", "minmax"] = "zscore"

    def __post_init__(self) -> None:
        check(8 <= self.size <= 512, field="size", expected="an integer in [8, 512]",
              found=self.size)
