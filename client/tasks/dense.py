"""What the dense tasks share: rows cut from source images, a site-local part, Adam.

Segmentation and detection rows are slices or tiles of a source image (the privacy
record), trained through a site-local part (a decoder, a detection head) that stays
in the site's state directory. Their plugins differ in the part, the loss and the
metric; the sampling, the privacy unit, the optimiser and the saved part's loading
are the same and live here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, TypeVar

import numpy as np
import torch

from client.tasks.base import SamplingPlan, Task, TaskData, patients_of
from client.tasks.finetuning import adam_on_trainable
from medmeta_common.checkpoint import torch_load
from medmeta_common.config import TrainConfig
from medmeta_common.privacy.sampling import FixedBatchSampler, Sampler, poisson_rate

if TYPE_CHECKING:
    from client.settings import SiteRuntime

log = logging.getLogger(__name__)


class SourcedData(TaskData, Protocol):
    """Task data whose rows each come from a source image."""

    @property
    def sources(self) -> np.ndarray:
        """The source image (volume, slide) of each row."""


S = TypeVar("S", bound=SourcedData)
M = TypeVar("M", bound=torch.nn.Module)


class DenseTask(Task[S]):
    """A task trained per row through a site-local part; see the module docstring."""

    reduction: ClassVar[Literal["mean", "sum"]] = "sum"
    encoder_output: ClassVar[Literal["embedding", "features"]] = "features"
    # Adam on the encoder's trainable set and the site part (the classification
    # recipe's SGD learning rate does not carry over).
    lr: ClassVar[float] = 1e-3

    def privacy_units(self, data: S, unit: str, *, source: str) -> np.ndarray | None:
        """Source images (``image``: all their slices/tiles together) or patients."""
        return data.sources if unit == "image" else patients_of(data, source=source)

    def optimizer(self, model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        """Adam on the encoder's trainable set and the site part."""
        return adam_on_trainable(model, self.lr)

    def sampling(self, data: S, train: TrainConfig) -> SamplingPlan:
        """Poisson sampling of ``train.batch_size`` expected rows a step (no class draw)."""
        return SamplingPlan(rate=poisson_rate(train.batch_size, len(data)))

    def nonprivate_sampler(self, data: S, train: TrainConfig, plan: SamplingPlan,
                           rng: np.random.Generator) -> Sampler:
        """``batch_size`` random rows a step (all, when fewer)."""
        return FixedBatchSampler(len(data), train.batch_size, rng)


def load_site_part(site: SiteRuntime, filename: str, fresh: M, what: str) -> M:
    """``fresh`` with the weights saved in the site's state directory, when they fit it."""
    path = site.state_dir / filename
    if path.exists():
        saved = torch_load(path)
        own = fresh.state_dict()
        if saved.keys() == own.keys() and all(saved[k].shape == own[k].shape for k in own):
            fresh.load_state_dict(saved)
        else:
            log.warning("site %s: the saved %s does not fit this model; starting a new one",
                        site.name, what)
    return fresh
