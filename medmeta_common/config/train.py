"""``train``: the local inner loop every site runs each round (sent by the server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medmeta_common.config.typed import check


@dataclass(frozen=True)
class TrainConfig:
    """The local inner loop every site runs each round (sent by the server).

    Attributes
    ----------
    loss : {"cosine", "protonet"}
        ``cosine``: per-record cross-entropy against the site's cosine classifier
        (DP-valid, the default). ``protonet``: episodic prototypical loss, which couples
        the records of an episode, so it is refused under DP.
    local_steps : int
        Optimiser steps per round at each site.
    batch_size : int
        Expected records per step. Under DP it sets the Poisson sampling rate.
    ways : int, optional
        Classes per step; ``null`` uses all of the site's classes.
    lr, momentum : float
        Local SGD settings.
    augment : bool
        Random flips and shifts, drawn per record.
    augment_multiplicity : int
        Augmented views of each sampled record per step; under DP the record's
        gradient is the mean over its views, clipped once (De et al. 2022).
    trainable : {"all", "film", "film_shift", "film_last_stage"}
        Which encoder parameters the sites train, send and the server meta-updates
        (:mod:`medmeta_common.models.factory`): every one (``all``, the CNNs trained from
        scratch), or, on EfficientNet-Lite0, its BatchNorm scale and shift (``film``)
        (``film``), only its shift (``film_shift``: half the coordinates, DP-BiTFiT
        style), or FiLM and its last block group and head (``film_last_stage``). The rest
        stays the public prior's at every site.
    head : {"train", "frozen"}
        Train the site's cosine head with the encoder, or keep it at its random,
        data-independent start (only the encoder learns, as in FedBABU).
    rotation_weight : float
        Weight of a self-supervised rotation-prediction loss (Gidaris et al. 2018):
        each sampled view is given a random quarter-turn, and the site-local rotation
        head must tell which. Per record, so DP-valid; 0 turns it off.
    shots, queries : int
        Episode shape of the ``protonet`` loss.

    """

    loss: Literal["cosine", "protonet"] = "cosine"
    local_steps: int = 20
    batch_size: int = 32
    ways: int | None = None
    lr: float = 0.03
    momentum: float = 0.9
    augment: bool = True
    augment_multiplicity: int = 1
    trainable: Literal["all", "film", "film_shift", "film_last_stage"] = "all"
    head: Literal["train", "frozen"] = "train"
    rotation_weight: float = 0.0
    shots: int = 5
    queries: int = 10

    def __post_init__(self) -> None:
        check(self.local_steps >= 1, field="local_steps", expected="at least 1",
              found=self.local_steps)
        check(self.batch_size >= 1, field="batch_size", expected="at least 1",
              found=self.batch_size)
        check(self.ways is None or self.ways >= 2, field="ways", expected="at least 2 or null",
              found=self.ways)
        check(self.lr > 0, field="lr", expected="a positive number", found=self.lr)
        check(0 <= self.momentum < 1, field="momentum", expected="a number in [0, 1)",
              found=self.momentum)
        check(1 <= self.augment_multiplicity <= 32, field="augment_multiplicity",
              expected="an integer in [1, 32]", found=self.augment_multiplicity)
        check(self.rotation_weight >= 0, field="rotation_weight", expected="0 or more",
              found=self.rotation_weight)
