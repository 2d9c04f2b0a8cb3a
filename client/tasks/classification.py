"""Classification: a site-local cosine head on the shared encoder, few-shot accuracy.

Per-record loss (the DP argument of this task)
-----------------------------------------------
Each step draws ``ways`` classes from the site's class list without looking at any
record, then Poisson-samples the records of those classes. The loss is a *sum of
per-record terms*: the cross-entropy of one record's cosine logits (restricted to the
drawn classes) against the site-local class weights (Baseline++, Chen et al. 2019).
No term depends on another record: no batch statistics (GroupNorm only), no in-batch
prototypes or negatives, and augmentation randomness is drawn per record. With
``augment_multiplicity`` k, a record's k augmented views (and, with
``rotation_weight``, their rotation-prediction terms) form *one* term: the mean over
its views, merged before clipping (De et al. 2022). The head is trained in the same
DP-SGD step, because it shapes later encoder updates. ``tests/test_dp_loss.py``
checks the per-record property on Opacus' per-sample gradients.

The ``protonet`` loss builds prototypes from records of the same episode, which
couples records; it is for non-private runs only (the config and the site refuse it
under DP).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from client.fewshot import evaluate_fewshot
from client.settings import RoundSettings, SiteRuntime, site_seed
from client.tasks.base import AdaptDefaults, AdaptRequest, Metrics, SamplingPlan, Task
from medmeta_common.checkpoint import atomic_torch_save, torch_load
from medmeta_common.config import DataConfig, FewShotConfig, ImageConfig, TrainConfig
from medmeta_common.data.records import SiteData
from medmeta_common.data.sources import load_site
from medmeta_common.device import autocast
from medmeta_common.episodes import classes_with_at_least, sample_episode
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead, prototypes
from medmeta_common.privacy.dp_sgd import BatchLoss, TaskLoss
from medmeta_common.privacy.sampling import Draw, Sampler
from medmeta_common.protocol import NUM_EXAMPLES

log = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
ROTATION_FILE = "rotation_head.pt"


class ClassificationTask(Task[SiteData]):
    """Images with class labels; see the module docstring."""

    name = "classification"
    record = "one image"
    rows = "images"
    reduction = "mean"
    adapt_defaults = AdaptDefaults(episodes=200, finetune_steps=0)

    def read(self, data: DataConfig, image: ImageConfig, *, tile: int) -> SiteData:
        """The site's labelled images, harmonised."""
        return load_site(data, image)

    def from_arrays(self, arrays: dict[str, np.ndarray]) -> SiteData:
        """The site's cached images."""
        return SiteData.from_arrays(arrays)

    def check_settings(self, settings: RoundSettings, *, private: bool) -> None:
        """The prototypical loss couples records: refused under DP."""
        if private and settings.train.loss != "cosine":
            raise ValueError("the server asked for the non-private 'protonet' loss; this site "
                             "trains under DP and only accepts the per-record 'cosine' loss")

    def site_model(self, site: SiteRuntime, encoder: SharedEncoder, data: SiteData,
                   settings: RoundSettings) -> EncoderWithHead:
        """The encoder with the site's cosine head (and rotation head, if asked for)."""
        head = load_head(site, data.classes, encoder.embedding_dim,
                         settings.model.cosine_scale, settings.seed)
        head.weight.requires_grad_(settings.train.head == "train")
        rotation = None
        if settings.train.rotation_weight > 0:
            rotation = load_rotation_head(site, encoder.embedding_dim, settings.seed)
        return EncoderWithHead(encoder, head, rotation)

    def save_site_model(self, site: SiteRuntime, model: torch.nn.Module,
                        data: SiteData) -> None:
        """Keep the heads in the state directory."""
        assert isinstance(model, EncoderWithHead)
        save_head(site, model.head, data.classes)  # type: ignore[arg-type]
        if model.rotation is not None:
            save_rotation_head(site, model.rotation)  # type: ignore[arg-type]

    def optimizer(self, model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
        """SGD with momentum (the prototypical loss trains the encoder only)."""
        assert isinstance(model, EncoderWithHead)
        params = model.encoder.parameters() if train.loss == "protonet" else model.parameters()
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum)

    def sampling(self, data: SiteData, train: TrainConfig) -> SamplingPlan:
        """Poisson sampling of the records of ``train.ways`` drawn classes."""
        n_classes = len(data.classes)
        ways = min(train.ways or n_classes, n_classes)
        return SamplingPlan(rate=poisson_rate_for(train, len(data), n_classes),
                            labels=data.labels, n_classes=n_classes, ways=ways)

    def nonprivate_sampler(self, data: SiteData, train: TrainConfig, plan: SamplingPlan,
                           rng: np.random.Generator) -> Sampler:
        """Episodes for the prototypical loss; otherwise the Poisson plan, seeded."""
        if train.loss == "protonet":
            return EpisodeSampler(data.labels, len(data.classes), train, rng)
        return plan.poisson(len(data), rng, None)

    def loss(self, model: torch.nn.Module, data: SiteData, train: TrainConfig, *,
             generator: torch.Generator, device: torch.device, amp: bool) -> TaskLoss:
        """The per-record cosine loss (or, without DP, the prototypical loss)."""
        if train.loss == "protonet":
            return protonet_loss(model, data, train, generator=generator, device=device,
                                 amp=amp)
        return cosine_loss(model, data, train, generator=generator, device=device, amp=amp)

    def evaluate(self, site: SiteRuntime, settings: RoundSettings, encoder: SharedEncoder,
                 val: SiteData, device: torch.device) -> Metrics:
        """Few-shot accuracy of ``encoder`` on the validation patients."""
        fewshot = fit_episode_shape(settings.evaluation, val.labels, len(val.classes))
        metrics: Metrics = {NUM_EXAMPLES: len(val)}
        if fewshot is None:
            log.warning("site %s: validation split too small for few-shot evaluation",
                        site.name)
            metrics["episodes"] = 0
            return metrics
        result = evaluate_fewshot(encoder, val.images, val.labels, len(val.classes), fewshot,
                                  seed=settings.seed + settings.server_round, device=device,
                                  scale=settings.model.cosine_scale)
        metrics.update({"accuracy": result.accuracy_mean, "accuracy-ci95": result.accuracy_ci95,
                        "episodes": result.episodes, "ways": result.ways})
        return metrics

    def adapt(self, request: AdaptRequest) -> tuple[dict[str, Any], str]:
        """Few-shot accuracy over episodes; with ``save``, a classifier from all images."""
        from client.tasks.classification_adapt import adapt_command

        return adapt_command(request, self.adapt_defaults)

    def owns_model(self, folder: Path) -> bool:
        """A folder written by ``adapt --save`` for classification."""
        from client.tasks.classification_adapt import ADAPTED_FILE

        return (folder / ADAPTED_FILE).exists() or folder.name == ADAPTED_FILE

    def predict(self, folder: Path, inputs: Path, out: Path | None) -> int:
        """Class probabilities as CSV (stdout without ``out``)."""
        from client.tasks.classification_predict import predict_command

        return predict_command(folder, inputs, out)


def poisson_rate_for(train: TrainConfig, n_records: int, n_classes: int) -> float:
    """Poisson rate giving ``train.batch_size`` expected records per step (capped at 1)."""
    from medmeta_common.privacy.sampling import poisson_rate

    return poisson_rate(train.batch_size, n_records, ways=train.ways, n_classes=n_classes)


def cosine_loss(model: torch.nn.Module, data: SiteData, train: TrainConfig, *,
                generator: torch.Generator, device: torch.device, amp: bool) -> TaskLoss:
    """The per-record loss of the module docstring, for the one DP-SGD loop."""
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    views = train.augment_multiplicity if train.augment else 1
    rotate = getattr(model, "rotation", None) is not None and train.rotation_weight > 0

    def loss(trained: torch.nn.Module, draw: Draw) -> BatchLoss:
        index = draw.index
        assert draw.classes is not None, "the cosine loss needs the step's drawn classes"
        # Each record appears ``views`` times, each with its own augmentation (and
        # rotation); its per-record term is the mean over its views.
        batch = images[index].repeat_interleave(views, dim=0)
        if train.augment:
            batch = augment(batch, generator)
        # A random quarter-turn per view, drawn independently of the data.
        turns = torch.randint(0, 4, (len(batch),), generator=generator)
        if rotate:
            batch = rotate_by(batch, turns)
        with autocast(device, amp):
            output = trained(batch.to(device))
        logits = (output[0] if rotate else output).float()
        total = episode_loss(logits, draw.classes, labels[index].repeat_interleave(views))
        if rotate:
            total = total + train.rotation_weight * F.cross_entropy(
                output[1].float(), turns.to(device), reduction="sum")
        rows = torch.arange(len(index)).repeat_interleave(views) if views > 1 else None
        return BatchLoss(total / views, len(index), rows)

    return loss


def episode_loss(logits: torch.Tensor, classes: np.ndarray, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each record's logits restricted to the drawn classes.

    ``labels`` are site class indices; each must be one of ``classes`` (sorted). The
    result is a sum of per-record terms, as DP-SGD requires.
    """
    drawn = torch.from_numpy(classes).to(logits.device)
    targets = torch.searchsorted(drawn, labels.to(logits.device))
    return F.cross_entropy(logits[:, drawn], targets, reduction="sum")


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


def rotate_by(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image by ``turns[i]`` quarter turns (square images)."""
    out = images.clone()
    for k in (1, 2, 3):
        rows = turns == k
        if rows.any():
            out[rows] = torch.rot90(images[rows], k, dims=(-2, -1))
    return out


class EpisodeSampler:
    """Non-private episodes (support then query records, class by class) for protonet."""

    def __init__(self, labels: np.ndarray, n_classes: int, train: TrainConfig,
                 rng: np.random.Generator) -> None:
        self.labels, self.n_classes, self.train, self.rng = labels, n_classes, train, rng
        self.ways = min(train.ways or n_classes, n_classes)

    def sample(self) -> Draw:
        """One episode's records: its support, then its queries."""
        episode = sample_episode(self.labels, ways=self.ways, shots=self.train.shots,
                                 queries=self.train.queries, rng=self.rng,
                                 n_classes=self.n_classes)
        return Draw(np.concatenate([episode.support, episode.query]), episode.classes)


def protonet_loss(model: torch.nn.Module, data: SiteData, train: TrainConfig, *,
                  generator: torch.Generator, device: torch.device, amp: bool) -> TaskLoss:
    """Episodic prototypical loss ("learn to compare"); couples records, non-private only."""
    images = torch.from_numpy(data.images)
    ways = min(train.ways or len(data.classes), len(data.classes))
    scale = float(getattr(model.head, "scale", 10.0))
    n_support = ways * train.shots
    encoder = model.encoder
    assert isinstance(encoder, torch.nn.Module)

    def loss(trained: torch.nn.Module, draw: Draw) -> BatchLoss:
        batch = images[draw.index]
        if train.augment:
            batch = augment(batch, generator)
        with autocast(device, amp):
            embeddings = encoder(batch.to(device)).float()  # non-private: the model itself
        support, query = embeddings[:n_support], embeddings[n_support:]
        support_labels = torch.arange(ways, device=device).repeat_interleave(train.shots)
        query_labels = torch.arange(ways, device=device).repeat_interleave(train.queries)
        protos = prototypes(support, support_labels, ways)
        logits = scale * F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).T
        # One episode-mean term: the step minimises it as it is.
        return BatchLoss(F.cross_entropy(logits, query_labels), 1)

    return loss


def fit_episode_shape(fewshot: FewShotConfig, labels: np.ndarray,
                      n_classes: int) -> FewShotConfig | None:
    """Shrink ways/queries to what a small validation split can hold (or give up)."""
    queries = fewshot.queries
    while queries >= 1:
        eligible = len(classes_with_at_least(labels, n_classes, fewshot.shots + queries))
        if eligible >= 2:
            return FewShotConfig(ways=min(fewshot.ways, eligible), shots=fewshot.shots,
                                 queries=queries, episodes=fewshot.episodes)
        queries //= 2
    return None


# --- The site-local heads (never leave the site) ---------------------------------------


def load_head(site: SiteRuntime, classes: tuple[str, ...], dim: int, scale: float,
              seed: int) -> CosineClassifier:
    """The site's persistent cosine head, or a fresh data-independent one."""
    path = site.state_dir / HEAD_FILE
    head = CosineClassifier(dim, len(classes), scale)
    if path.exists():
        saved = torch_load(path)
        shape = tuple(saved["weight"].shape)
        if tuple(saved["classes"]) == classes and shape == (len(classes), dim):
            head.weight.data.copy_(saved["weight"])
            return head
        log.warning("site %s: saved head does not match the class list or encoder; starting a "
                    "new head", site.name)
    generator = torch.Generator().manual_seed(site_seed(site.name, seed))
    head.weight.data.copy_(torch.randn(len(classes), dim, generator=generator) * 0.1)
    return head


def save_head(site: SiteRuntime, head: CosineClassifier, classes: tuple[str, ...]) -> None:
    """Persist the site's head (it never leaves the site)."""
    atomic_torch_save(site.state_dir / HEAD_FILE,
                      {"classes": list(classes), "weight": head.weight.detach().cpu()})


def load_rotation_head(site: SiteRuntime, dim: int, seed: int) -> torch.nn.Linear:
    """The site's persistent 4-way rotation head, or a fresh data-independent one."""
    path = site.state_dir / ROTATION_FILE
    head = torch.nn.Linear(dim, 4)
    if path.exists():
        saved = torch_load(path)
        if tuple(saved["weight"].shape) == (4, dim):
            head.load_state_dict(saved)
            return head
    generator = torch.Generator().manual_seed(site_seed(site.name, seed) + 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4, dim, generator=generator) * 0.01)
        head.bias.zero_()
    return head


def save_rotation_head(site: SiteRuntime, head: torch.nn.Linear) -> None:
    """Persist the site's rotation head (it never leaves the site)."""
    atomic_torch_save(site.state_dir / ROTATION_FILE,
                      {k: v.detach().cpu() for k, v in head.state_dict().items()})
