"""What a task plugin supplies to the one site round (:mod:`client.round`).

A *task* is what a site trains the shared encoder for: classification, segmentation,
and whatever comes next. The round skeleton owns everything that must be the same
for every task — seeds, the DP warning, the budget guard, the DP-SGD wiring, the
ledger, the reply — and asks the task only for what differs:

- its data (through the one ingestion pipeline, :mod:`medmeta_common.data.sources`,
  so every data field and bad-file policy means the same, and the site's cache
  serves it), and which rows form one *privacy record* (an image; a volume for its
  slices; a slide for its tiles) or one patient;
- its site-local parts (a head, a decoder), kept in the site's state directory and
  never sent;
- its optimiser, its sampling plan, and its per-record loss (a sum of per-row terms,
  each depending on one row only: the task states why and tests it);
- its validation metric, and its ``adapt`` / ``predict`` routines for a new site.

A new task is one new module in ``client/tasks/`` registered in
:mod:`client.tasks`; its name goes into :data:`medmeta_common.config.tasks.TaskName`
with the data fields it cannot honour.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar

import numpy as np
import torch

from medmeta_common.config import DataConfig, ImageConfig, TrainConfig
from medmeta_common.errors import ConfigError
from medmeta_common.models.factory import has_film
from medmeta_common.privacy.dp_sgd import TaskLoss
from medmeta_common.privacy.sampling import PoissonSampler, Sampler

if TYPE_CHECKING:
    from client.settings import RoundSettings, SiteRuntime
    from medmeta_common.models.encoder import SharedEncoder

Metrics = dict[str, float | int]


class TaskData(Protocol):
    """A task's harmonised site data: rows with a group (patient) each, and a cache form."""

    @property
    def groups(self) -> np.ndarray:
        """The patient (or other group) of each row."""

    @property
    def groups_known(self) -> bool:
        """Whether the groups are patients named by the source."""

    @property
    def refs(self) -> tuple[str, ...]:
        """Where each row came from."""

    def __len__(self) -> int:
        """Rows (training records before augmentation)."""

    def subset(self, index: np.ndarray) -> Any:
        """The rows at ``index``."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for the site's data cache."""


@dataclass(frozen=True)
class SamplingPlan:
    """How a round's steps draw their records: the Poisson rate and the class draw."""

    rate: float
    labels: np.ndarray | None = None
    n_classes: int = 1
    ways: int | None = None

    def poisson(self, n_records: int, rng: np.random.Generator,
                units: np.ndarray | None) -> PoissonSampler:
        """The DP-valid sampler of this plan."""
        return PoissonSampler(n_records, sample_rate=self.rate, rng=rng, labels=self.labels,
                              n_classes=self.n_classes, ways=self.ways, units=units)


@dataclass(frozen=True)
class AdaptRequest:
    """What ``medmeta adapt`` asks of a task (the command line's shared flags)."""

    checkpoint: Path
    data: DataConfig
    shots: int
    ways: int | None
    queries: int
    episodes: int | None
    finetune_steps: int | None
    finetune: Literal["head", "film", "all"] | None
    tile: int
    seed: int
    save: Path | None


@dataclass(frozen=True)
class AdaptDefaults:
    """A task's defaults for ``medmeta adapt`` flags left unset (shown in ``--help``).

    Fine-tuning (``finetune`` mode, ``finetune_steps`` at ``finetune_lr``) is the default
    from ``finetune_from_shots`` labelled images per class up; below it, prototypes alone.
    """

    episodes: int
    finetune_steps: int
    finetune: Literal["head", "film", "all"] = "head"
    finetune_lr: float | None = None
    finetune_from_shots: int = 1

    def for_backbone(self, backbone: str) -> AdaptDefaults:
        """These defaults for a meta-model of ``backbone``.

        FiLM fine-tuning needs BatchNorm layers (EfficientNet-Lite0); the small CNN
        keeps the first release's default, prototypes alone over 200 episodes.
        """
        if self.finetune == "film" and not has_film(backbone):
            return replace(self, episodes=200, finetune_steps=0, finetune="head")
        return self

    def steps_for(self, shots: int, asked: int | None) -> int:
        """The fine-tuning steps of an adaptation with ``shots`` (``asked`` wins)."""
        if asked is not None:
            return asked
        return self.finetune_steps if shots >= self.finetune_from_shots else 0


D = TypeVar("D", bound=TaskData)


class Task(ABC, Generic[D]):
    """A task plugin over its data type ``D``; see the module docstring."""

    name: ClassVar[str]
    # What one privacy record is at this task's sites (for reports and docs).
    record: ClassVar[str]
    # What a row of the training data is called in logs ("images", "slices/tiles").
    rows: ClassVar[str]
    # Without DP, minimise the batch's mean or sum of per-row terms.
    reduction: ClassVar[Literal["mean", "sum"]] = "mean"
    # What of the encoder the task's loss reads: its embedding, or its feature maps.
    encoder_output: ClassVar[Literal["embedding", "features"]] = "embedding"
    adapt_defaults: ClassVar[AdaptDefaults]

    # --- data ----------------------------------------------------------------------

    @abstractmethod
    def read(self, data: DataConfig, image: ImageConfig, *, tile: int) -> D:
        """Read, select and harmonise the site's data (the one ingestion pipeline)."""

    @abstractmethod
    def from_arrays(self, arrays: dict[str, np.ndarray]) -> D:
        """The data the site's cache held (written by ``TaskData.to_arrays``)."""

    def validation_groups(self, site_name: str, data: D) -> np.ndarray:
        """Groups the train/validation split keeps together (patients)."""
        return data.groups

    def privacy_units(self, data: D, unit: str, *, source: str) -> np.ndarray | None:
        """The privacy unit of each row, or ``None`` when each row is its own record.

        The default: rows are records, and ``patient`` needs patient ids in the data.
        """
        if unit == "image":
            return None
        return patients_of(data, source=source)

    # --- training --------------------------------------------------------------------

    def check_settings(self, settings: RoundSettings, *, private: bool) -> None:
        """Refuse (ValueError) what the server asked that this site cannot do."""
        return None  # every task accepts every setting by default

    @abstractmethod
    def site_model(self, site: SiteRuntime, encoder: SharedEncoder, data: D,
                   settings: RoundSettings) -> torch.nn.Module:
        """The encoder with this site's local parts, from its state directory or fresh."""

    @abstractmethod
    def save_site_model(self, site: SiteRuntime, model: torch.nn.Module,
                        data: D) -> None:
        """Keep the site-local parts in the state directory (they never leave the site)."""

    @abstractmethod
    def optimizer(self, model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        """The local optimiser over the parameters to train."""

    @abstractmethod
    def sampling(self, data: D, train: TrainConfig) -> SamplingPlan:
        """The Poisson rate (and class draw) giving ``train.batch_size`` records a step."""

    def nonprivate_sampler(self, data: D, train: TrainConfig, plan: SamplingPlan,
                           rng: np.random.Generator) -> Sampler:
        """How steps draw records without DP (default: the same Poisson plan, seeded)."""
        return plan.poisson(len(data), rng, None)

    @abstractmethod
    def loss(self, model: torch.nn.Module, data: D, train: TrainConfig, *,
             generator: torch.Generator, device: torch.device, amp: bool) -> TaskLoss:
        """The batch loss: a sum of per-row terms (see :class:`~.dp_sgd.BatchLoss`)."""

    def unreachable(self, encoder: SharedEncoder) -> list[str]:
        """Encoder parameters this task's loss never reaches (frozen for its rounds)."""
        return encoder.unused_by(self.encoder_output)

    def after_training(self, model: torch.nn.Module) -> None:
        """Undo any training-only state (e.g. frozen parameters)."""
        return None  # nothing to undo by default

    # --- evaluation and a new site ---------------------------------------------------

    @abstractmethod
    def evaluate(self, site: SiteRuntime, settings: RoundSettings, encoder: SharedEncoder,
                 val: D, device: torch.device) -> Metrics:
        """The validation metric of ``encoder`` at this site (released in the reply)."""

    @abstractmethod
    def adapt(self, request: AdaptRequest) -> tuple[dict[str, Any], str]:
        """``medmeta adapt``: the ``--json`` report and its one-line summary."""

    @abstractmethod
    def owns_model(self, folder: Path) -> bool:
        """Whether ``folder`` holds a model this task's ``adapt --save`` wrote."""

    @abstractmethod
    def predict(self, folder: Path, inputs: Path, out: Path | None) -> int:
        """``medmeta predict`` with this task's saved model; the number of bad files."""


def patients_of(data: D, *, source: str) -> np.ndarray:
    """Patient ids of the rows; :class:`ConfigError` when the data names no patients."""
    if not data.groups_known:
        raise ConfigError(source=source, field="privacy.unit", expected="'image', or patient "
                          "ids in the data (a DICOM PatientID, a manifest's patient_id column, "
                          "an .npz group key)", found="'patient' with data that names no "
                          "patients (each image would count as a patient)")
    return data.groups
