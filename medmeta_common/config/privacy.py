"""``privacy``: a site's differential-privacy settings (the site enforces them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medmeta_common.config.typed import check


@dataclass(frozen=True)
class PrivacyConfig:
    """A site's differential-privacy settings. The site enforces them, not the server.

    Attributes
    ----------
    enabled : bool
        DP-SGD on (default). Turning it off is explicit and warned about at every start.
    epsilon : float
        The site's total budget; training stops before it would be exceeded.
    delta : float, optional
        δ of the guarantee; default ``min(1e-5, 1/(10 N))`` for N training records.
    max_grad_norm : float
        Per-record gradient clipping bound.
    noise_multiplier : float, optional
        Noise std / clip bound. ``null``: calibrated once so that the planned rounds
        spend exactly the budget.
    unit : {"image", "patient"}
        The privacy unit: one image (record), or one patient (all of a patient's
        images: patients are Poisson-sampled and each patient's summed gradient is
        clipped). ``patient`` needs patient IDs in the data (manifest, DICOM, group key).
    accountant : {"prv", "rdp"}
        How ε is computed (and the noise calibrated): the nearly tight PRV accountant
        (default), or RDP with Balle et al.'s conversion (looser, about 8% more ε at
        the same noise); :mod:`medmeta_common.privacy.accounting`.

    """

    enabled: bool = True
    epsilon: float = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    unit: Literal["image", "patient"] = "image"
    accountant: Literal["prv", "rdp"] = "prv"

    def __post_init__(self) -> None:
        check(self.epsilon > 0, field="epsilon", expected="a positive number", found=self.epsilon)
        check(self.delta is None or 0 < self.delta < 1e-3, field="delta",
              expected="a number in (0, 1e-3), well below 1/N", found=self.delta)
        check(self.max_grad_norm > 0, field="max_grad_norm", expected="a positive number",
              found=self.max_grad_norm)
        check(self.noise_multiplier is None or self.noise_multiplier > 0,
              field="noise_multiplier", expected="a positive number or null",
              found=self.noise_multiplier)
