"""DP-SGD at a site: the one local training loop, and how it is made private with Opacus.

Privacy argument
----------------
A site's DP guarantee covers what its training releases (the encoder update) with
respect to adding or removing one privacy unit (a record, or a patient). It holds
because every step of :func:`train_steps` under ``dp`` is one application of the
sampled Gaussian mechanism:

1. *Sampling*: the step's units are drawn by
   :class:`~medmeta_common.privacy.sampling.PoissonSampler` at rate ``q`` from fresh
   OS entropy (never from the federation's seed, which the server knows), after a
   class draw that looks at no record. The accountant is given ``q``.
2. *A sum of per-unit terms*: the task's loss of a batch is a sum over its rows of
   terms that each depend on one row and the parameters only: no batch statistics
   (GroupNorm, or BatchNorm with frozen statistics, never batch BatchNorm), no
   in-batch prototypes or negatives, augmentation drawn per row. Each task states and
   tests this for its loss (``client/tasks/``). Rows of one unit (the augmented
   views of a record, the records of a patient, the slices of a volume) are merged
   into one per-sample gradient before clipping (:func:`merge_rows`), so removing a
   unit removes exactly one clipped term.
3. *Clipping and noise*: Opacus computes per-sample gradients of the summed loss
   (``loss_reduction="sum"``), clips each unit's to ``max_grad_norm``, sums, adds
   Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` drawn
   from OS entropy, and divides by the *expected* batch size (fixed, as Poisson
   sampling requires). A step whose batch is empty still takes the noise-only step.
4. *Accounting*: the steps are composed by the site's accountant
   (:mod:`medmeta_common.privacy.accounting`), recorded in its ledger before the
   update leaves (:mod:`medmeta_common.privacy.budget`).

Everything trained under ``dp`` is covered: the shared encoder and the site's own
heads or decoders, trained in the same step. Non-private training (``dp=None``)
uses the same loop, seeded and reproducible, and says so at every start.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from medmeta_common.privacy.sampling import Draw, PoissonSampler, Sampler

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

log = logging.getLogger(__name__)


def load_dp_library() -> None:
    """Import Opacus and register our per-sample gradient rules (~1.5 s, once per process).

    A train message loads it with the rest of its start-up, so that its compute time
    (and the round's ``compute-seconds``) is compute.
    """
    import opacus  # noqa: F401

    from medmeta_common.privacy import grad_samplers  # noqa: F401 - registers our rules


@dataclass(frozen=True)
class DPSettings:
    """The DP-SGD mechanism of one round: noise, sampling rate, clipping bound, unit.

    With ``unit == "patient"`` patients are Poisson-sampled and each patient's summed
    gradient (over all their records in the step) is clipped as one contribution.
    """

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    unit: str = "image"


@dataclass(frozen=True)
class BatchLoss:
    """What a task's loss gives for one step's batch.

    Attributes
    ----------
    total : torch.Tensor
        The sum of the per-row terms (a 0-d tensor).
    records : int
        Records in the batch (the divisor of a mean-reduced non-private step).
    rows : torch.Tensor, optional
        For each row of the forward pass, the position of its record in the draw's
        index (rows are augmented views of records); ``None``: one row per record.

    """

    total: torch.Tensor
    records: int
    rows: torch.Tensor | None = None


# (the module being trained, the step's draw) -> the batch's loss.
TaskLoss = Callable[[torch.nn.Module, Draw], BatchLoss]


@dataclass(frozen=True)
class StepStats:
    """What the steps did (the loss is only ever reported without DP)."""

    steps: int
    records_seen: int
    mean_loss: float


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dp: DPSettings,
                 expected_batch_size: float, device: torch.device
                 ) -> tuple[GradSampleModule, DPOptimizer]:
    """Opacus DP-SGD around ``model`` and ``optimizer``, noise drawn from OS entropy.

    Per-sample gradients of a *summed* loss; the DPOptimizer clips each, sums, adds
    noise and divides by the *expected* batch size (fixed, as Poisson sampling requires).
    """
    # Opacus is imported here, not at the top: it costs ~1.2 s, and evaluation and
    # adaptation never need it.
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from medmeta_common.privacy import grad_samplers  # noqa: F401 - registers our rules

    # The input images need no gradient, which torch's full backward hooks (used by
    # Opacus) warn about at every step; the warning is expected and says nothing.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    private = DPOptimizer(optimizer, noise_multiplier=dp.noise_multiplier,
                          max_grad_norm=dp.max_grad_norm,
                          expected_batch_size=expected_batch_size,
                          loss_reduction="mean",
                          generator=torch.Generator(device=device).manual_seed(
                              secrets.randbits(63)))
    return GradSampleModule(model, loss_reduction="sum"), private


def merge_rows(model: torch.nn.Module, unit_of_row: torch.Tensor, units: int) -> None:
    """Sum the per-row gradients of each privacy unit into one gradient (before clipping).

    Rows are augmented views of a record, records of a patient, or slices of a
    volume: each unit then contributes one gradient, and DP-SGD clips that.
    """
    for param in model.parameters():
        sample = getattr(param, "grad_sample", None)
        if sample is not None and len(unit_of_row):
            merged = torch.zeros((units, *sample.shape[1:]), dtype=sample.dtype,
                                 device=sample.device)
            param.grad_sample = merged.index_add_(  # type: ignore[attr-defined]
                0, unit_of_row.to(sample.device), sample)


def train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sampler: Sampler,
                loss: TaskLoss, *, steps: int, dp: DPSettings | None, device: torch.device,
                reduction: Literal["mean", "sum"] = "mean") -> StepStats:
    """``steps`` steps of (DP-)SGD of ``model`` on the task's ``loss``.

    Parameters
    ----------
    model : torch.nn.Module
        The encoder with the task's site-local parts; trained in place.
    optimizer : torch.optim.Optimizer
        Over the parameters to train (under DP, wrapped by Opacus' DPOptimizer).
    sampler : Sampler
        Under DP a :class:`PoissonSampler` at ``dp.sample_rate`` (checked).
    loss : callable
        ``loss(module, draw)``: the batch's summed loss (see :class:`BatchLoss`).
    steps : int
        Optimiser steps.
    dp : DPSettings or None
        The mechanism; ``None`` trains without DP.
    device : torch.device
        Where the model trains.
    reduction : {"mean", "sum"}
        Without DP, minimise the mean (or the sum) of the batch's terms.

    """
    trained: torch.nn.Module = model
    poisson: PoissonSampler | None = None
    if dp is not None:
        if not isinstance(sampler, PoissonSampler) or \
                not math.isclose(sampler.sample_rate, dp.sample_rate):
            raise ValueError("DP-SGD needs the Poisson sampler at the accounted rate")
        poisson = sampler
        trained, optimizer = make_private(model, optimizer, dp, sampler.expected_batch_size(),
                                          device)
    losses, seen = [], 0
    for _ in range(steps):
        draw = sampler.sample()
        optimizer.zero_grad(set_to_none=True)
        batch = loss(trained, draw)
        if poisson is not None:
            batch.total.backward()  # an empty batch still takes the noise-only step
            _merge_units(model, poisson, draw.index, batch.rows)
            optimizer.step()
        elif batch.records:
            (batch.total / batch.records if reduction == "mean" else batch.total).backward()
            optimizer.step()
        seen += batch.records
        if batch.records:
            losses.append(float(batch.total.detach()) / batch.records)
    if dp is not None:
        trained.to_standard_module()  # type: ignore[operator]  # hooks off; model keeps weights
    return StepStats(steps, seen, float(np.mean(losses)) if losses else float("nan"))


def _merge_units(model: torch.nn.Module, sampler: PoissonSampler, index: np.ndarray,
                 rows: torch.Tensor | None) -> None:
    """One per-sample gradient per privacy unit: merge views and records of a unit."""
    units = sampler.units_of(index)
    if units is None and rows is None:
        return  # one row per record, and each record its own unit
    if units is None:
        units = np.arange(len(index))
    record_unit = torch.from_numpy(units)
    unit_of_row = record_unit if rows is None else record_unit[rows]
    merge_rows(model, unit_of_row, int(units.max(initial=-1)) + 1)
