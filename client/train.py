"""The local inner loop a site runs each round: DP-SGD on a per-record loss.

Privacy argument (the default ``cosine`` loss)
-----------------------------------------------
Each step draws ``ways`` classes from the site's class list without looking at any
record, then Poisson-samples the records of those classes at rate ``q``
(:class:`~medmeta_common.episodes.PoissonEpisodeSampler`). The loss is a *sum of
per-record terms*: the cross-entropy of one record's cosine logits (restricted to
the drawn classes) against the site-local class weights. No term depends on another
record: no batch statistics (GroupNorm only), no in-batch prototypes or negatives,
and augmentation randomness is drawn per record. So removing one record removes
exactly one term, Opacus clips each record's gradient to ``max_grad_norm`` and adds
Gaussian noise of std ``noise_multiplier * max_grad_norm`` to the sum, and the
sampled Gaussian mechanism's RDP accounting applies with rate ``q`` (the class draw
only lowers a record's inclusion probability further). The head is trained under
the same DP-SGD step, because it shapes later encoder updates. Tests check the
per-record property on per-sample gradients.

The ``protonet`` loss builds prototypes from records of the same episode, which
couples records; it is for non-private runs only (the config refuses it under DP).
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from medmeta_common.config import TrainConfig
from medmeta_common.data.records import SiteData
from medmeta_common.device import autocast
from medmeta_common.episodes import PoissonEpisodeSampler, sample_episode
from medmeta_common.models.heads import EncoderWithHead, prototypes

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

log = logging.getLogger(__name__)


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
class RoundStats:
    """What a round did (the loss is only ever reported without DP)."""

    steps: int
    records_seen: int
    mean_loss: float


def sample_rate_for(train: TrainConfig, n_records: int, n_classes: int) -> float:
    """Poisson rate giving ``train.batch_size`` expected records per step (capped at 1)."""
    ways = min(train.ways or n_classes, n_classes)
    per_step_pool = n_records * ways / n_classes
    return float(min(1.0, train.batch_size / max(per_step_pool, 1.0)))


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and a shift of up to ``shift`` pixels, drawn per record."""
    if len(images) == 0:
        return images
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(n, 1, 1, 1).to(images.device), images.flip(-1), images)
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def episode_loss(logits: torch.Tensor, classes: np.ndarray, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each record's logits restricted to the drawn classes.

    ``labels`` are site class indices; each must be one of ``classes`` (sorted). The
    result is a sum of per-record terms, as DP-SGD requires.
    """
    drawn = torch.from_numpy(classes).to(logits.device)
    targets = torch.searchsorted(drawn, labels.to(logits.device))
    return F.cross_entropy(logits[:, drawn], targets, reduction="sum")


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dp: DPSettings,
                 expected_batch_size: int, device: torch.device
                 ) -> tuple[GradSampleModule, DPOptimizer]:
    """Opacus DP-SGD around ``model`` and ``optimizer``, noise drawn from OS entropy.

    Per-record gradients of a *summed* loss; the DPOptimizer clips each, sums, adds
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
                          expected_batch_size=expected_batch_size, loss_reduction="mean",
                          generator=torch.Generator(device=device).manual_seed(
                              secrets.randbits(63)))
    return GradSampleModule(model, loss_reduction="sum"), private


def train_cosine(
    model: EncoderWithHead,
    data: SiteData,
    train: TrainConfig,
    *,
    dp: DPSettings | None,
    sample_rate: float,
    seed: int,
    device: torch.device,
    amp: bool = False,
) -> RoundStats:
    """``train.local_steps`` steps of (DP-)SGD on the per-record cosine-classifier loss.

    Under DP the record sampling and the noise are drawn from fresh OS entropy, never
    from ``seed``: the seed is in the federation's config, and the analysis (privacy
    amplification by Poisson sampling, Gaussian noise) needs both hidden from the server.
    DP runs are therefore not bit-reproducible; non-private runs are.
    """
    rng = np.random.default_rng(secrets.randbits(128) if dp is not None else seed)
    generator = torch.Generator().manual_seed(seed)
    n_classes = len(data.classes)
    ways = min(train.ways or n_classes, n_classes)
    by_patient = dp is not None and dp.unit == "patient"
    sampler = PoissonEpisodeSampler(data.labels, n_classes=n_classes, ways=ways,
                                    sample_rate=sample_rate, rng=rng,
                                    groups=data.groups if by_patient else None)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    model.to(device).train()
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=train.lr,
                                                       momentum=train.momentum)
    trained: torch.nn.Module = model
    if dp is not None:
        trained, optimizer = make_private(model, optimizer, dp,
                                          sampler.expected_batch_size(), device)
    views = train.augment_multiplicity if train.augment else 1
    rotate = model.rotation is not None and train.rotation_weight > 0
    losses, seen = [], 0
    for _ in range(train.local_steps):
        classes, index = sampler.sample()
        # Each record appears ``views`` times, each with its own augmentation (and
        # rotation); its per-record gradient is the mean over its views (De et al. 2022).
        batch = images[index].repeat_interleave(views, dim=0)
        if train.augment:
            batch = augment(batch, generator)
        # A random quarter-turn per view, drawn independently of the data.
        turns = torch.randint(0, 4, (len(batch),), generator=generator)
        if rotate:
            batch = rotate_by(batch, turns)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            output = trained(batch.to(device))
        logits = (output[0] if rotate else output).float()
        loss_sum = episode_loss(logits, classes, labels[index].repeat_interleave(views))
        if rotate:
            loss_sum = loss_sum + train.rotation_weight * F.cross_entropy(
                output[1].float(), turns.to(device), reduction="sum")
        loss_sum = loss_sum / views
        if dp is not None:
            loss_sum.backward()  # an empty batch still takes the noise-only step
            if by_patient:
                assert sampler.units is not None
                _, unit_of_record = np.unique(sampler.units[index], return_inverse=True)
                rows = torch.from_numpy(unit_of_record).repeat_interleave(views)
                _merge_rows(model, rows, int(unit_of_record.max(initial=-1)) + 1)
            elif views > 1:
                _merge_rows(model, torch.arange(len(index)).repeat_interleave(views), len(index))
            optimizer.step()
        elif len(index):
            (loss_sum / len(index)).backward()
            optimizer.step()
        seen += len(index)
        if len(index):
            losses.append(float(loss_sum.detach()) / len(index))
    if dp is not None:
        trained._close()  # remove Opacus hooks; ``model`` keeps the trained weights
    return RoundStats(train.local_steps, seen, float(np.mean(losses)) if losses else float("nan"))


def rotate_by(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image by ``turns[i]`` quarter turns (square images)."""
    out = images.clone()
    for k in (1, 2, 3):
        rows = turns == k
        if rows.any():
            out[rows] = torch.rot90(images[rows], k, dims=(-2, -1))
    return out


def _merge_rows(model: torch.nn.Module, unit_of_row: torch.Tensor, units: int) -> None:
    """Sum the per-row gradients of each privacy unit into one gradient (before clipping).

    Rows are augmented views of a record, or records of a patient: each unit then
    contributes one gradient, and DP-SGD clips that.
    """
    for param in model.parameters():
        sample = getattr(param, "grad_sample", None)
        if sample is not None and len(unit_of_row):
            merged = torch.zeros((units, *sample.shape[1:]), dtype=sample.dtype,
                                 device=sample.device)
            param.grad_sample = merged.index_add_(0, unit_of_row.to(sample.device), sample)


def train_protonet(
    model: EncoderWithHead,
    data: SiteData,
    train: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    amp: bool = False,
) -> RoundStats:
    """Non-private episodic prototypical training ("learn to compare")."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    n_classes = len(data.classes)
    ways = min(train.ways or n_classes, n_classes)
    encoder = model.encoder.to(device).train()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=train.lr, momentum=train.momentum)
    images = torch.from_numpy(data.images)
    scale = float(getattr(model.head, "scale", 10.0))
    losses = []
    for _ in range(train.local_steps):
        episode = sample_episode(data.labels, ways=ways, shots=train.shots,
                                 queries=train.queries, rng=rng, n_classes=n_classes)
        batch = images[np.concatenate([episode.support, episode.query])]
        if train.augment:
            batch = augment(batch, generator)
        with autocast(device, amp):
            embeddings = encoder(batch.to(device)).float()
        support, query = embeddings[: len(episode.support)], embeddings[len(episode.support):]
        protos = prototypes(support, torch.as_tensor(episode.support_labels, device=device), ways)
        logits = scale * F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).T
        loss = F.cross_entropy(logits, torch.as_tensor(episode.query_labels, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    seen = train.local_steps * ways * (train.shots + train.queries)
    return RoundStats(train.local_steps, seen, float(np.mean(losses)))
