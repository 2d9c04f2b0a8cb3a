"""Few-shot evaluation: prototype classifiers on an encoder, optionally fine-tuned.

An episode's support images give one prototype per class (the mean normalised
embedding); queries go to the nearest prototype by cosine similarity. Fine-tuning
(optional) starts a cosine classifier from the prototypes and trains it on the
support set only — the head alone (``head``), with the encoder's FiLM parameters
(``film``: BatchNorm scale and shift, EfficientNet-Lite0 only), or with the whole
encoder (``all``).
Accuracy is reported as the mean over episodes with a 95% normal interval
(1.96 standard errors), as in the few-shot literature.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from medmeta_common.config import FewShotConfig
from medmeta_common.device import autocast
from medmeta_common.episodes import Episode, sample_episode
from medmeta_common.models.factory import freeze_all_but
from medmeta_common.models.heads import CosineClassifier, prototypes
from medmeta_common.progress import track

FinetuneMode = Literal["head", "film", "all"]

# Adam's learning rate of each fine-tuning mode (``FewShotConfig.finetune_lr`` overrides):
# the head alone moves fast; the encoder's FiLM or all parameters, slowly.
FINETUNE_LR: dict[str, float] = {"head": 0.01, "film": 1e-3, "all": 1e-3}


@dataclass(frozen=True)
class FewShotResult:
    """Accuracy over episodes: mean and 95% interval half-width."""

    accuracy_mean: float
    accuracy_ci95: float
    ways: int
    shots: int
    episodes: int
    accuracies: tuple[float, ...] = field(default=(), repr=False)

    def to_json(self) -> dict[str, float | int]:
        """The stable ``--json`` schema of ``medmeta adapt``."""
        return {
            "accuracy_mean": self.accuracy_mean,
            "accuracy_ci95": self.accuracy_ci95,
            "ways": self.ways,
            "shots": self.shots,
            "episodes": self.episodes,
        }


def mean_ci95(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and 95% interval half-width (1.96 standard errors); ``nan`` for no values."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return math.nan, math.nan
    ci = 1.96 * array.std(ddof=1) / math.sqrt(array.size) if array.size > 1 else 0.0
    return float(array.mean()), float(ci)


def summarise(accuracies: list[float], ways: int, shots: int) -> FewShotResult:
    """Mean and 95% interval (1.96 standard errors) of per-episode accuracies."""
    mean, ci = mean_ci95(accuracies)
    return FewShotResult(mean, ci, ways, shots, len(accuracies),
                         tuple(float(v) for v in accuracies))


@torch.no_grad()
def embed(encoder: torch.nn.Module, images: np.ndarray, device: torch.device,
          batch_size: int = 512, amp: bool = False) -> torch.Tensor:
    """Embeddings ``(N, D)`` of all images (float32, on ``device``)."""
    encoder.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        with autocast(device, amp):
            out.append(encoder(batch).float())
    if not out:
        return torch.zeros(0, getattr(encoder, "embedding_dim", 1), device=device)
    return torch.cat(out)


def prototype_accuracy(embeddings: torch.Tensor, episode: Episode) -> float:
    """Accuracy of the nearest-prototype classifier on one episode's queries."""
    ways = len(episode.classes)
    support_labels = torch.as_tensor(episode.support_labels, device=embeddings.device)
    protos = prototypes(embeddings[episode.support], support_labels, ways)
    scores = F.normalize(embeddings[episode.query], dim=-1) @ F.normalize(protos, dim=-1).T
    predicted = scores.argmax(dim=1).cpu().numpy()
    return float((predicted == episode.query_labels).mean())


def evaluate_fewshot(
    encoder: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    fewshot: FewShotConfig,
    *,
    seed: int,
    device: torch.device,
    finetune: FinetuneMode = "head",
    scale: float = 10.0,
    amp: bool = False,
) -> FewShotResult:
    """Accuracy of few-shot adaptation over ``fewshot.episodes`` seeded episodes."""
    rng = np.random.default_rng(seed)
    episodes = [
        sample_episode(labels, ways=fewshot.ways, shots=fewshot.shots, queries=fewshot.queries,
                       rng=rng, n_classes=n_classes)
        for _ in range(fewshot.episodes)
    ]
    accuracies = []
    lr = fewshot.finetune_lr or FINETUNE_LR[finetune]
    if fewshot.finetune_steps == 0 or finetune == "head":
        embeddings = embed(encoder, images, device, amp=amp)
        for episode in track(episodes, "few-shot episodes"):
            if fewshot.finetune_steps == 0:
                accuracies.append(prototype_accuracy(embeddings, episode))
            else:
                accuracies.append(_finetune_head_accuracy(embeddings, episode,
                                                          fewshot.finetune_steps, scale, lr))
    else:
        for episode in track(episodes, "few-shot episodes (fine-tuning)"):
            accuracies.append(_finetune_encoder_accuracy(
                encoder, images, episode, fewshot.finetune_steps, scale, device, amp,
                lr=lr, part=finetune))
    return summarise(accuracies, fewshot.ways, fewshot.shots)


def fit_head(embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int,
             scale: float, lr: float = 0.01) -> CosineClassifier:
    """A cosine classifier started at the class prototypes, then trained ``steps`` times."""
    head = CosineClassifier(embeddings.shape[1], n_classes, scale).to(embeddings.device)
    head.set_prototypes(prototypes(embeddings, labels, n_classes))
    if steps == 0:  # prototypes only; building an optimizer alone costs torch ~1 s of imports
        return head
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head(embeddings), labels).backward()
        optimizer.step()
    return head


def _finetune_head_accuracy(embeddings: torch.Tensor, episode: Episode, steps: int,
                            scale: float, lr: float) -> float:
    ways = len(episode.classes)
    labels = torch.as_tensor(episode.support_labels, device=embeddings.device)
    with torch.enable_grad():
        head = fit_head(embeddings[episode.support], labels, ways, steps, scale, lr=lr)
    with torch.no_grad():
        predicted = head(embeddings[episode.query]).argmax(dim=1).cpu().numpy()
    return float((predicted == episode.query_labels).mean())


def finetune_encoder(encoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     n_classes: int, steps: int, scale: float, device: torch.device, amp: bool,
                     lr: float = 1e-3, part: str = "all"
                     ) -> tuple[torch.nn.Module, CosineClassifier]:
    """Copy the encoder; fine-tune ``part`` of it with a prototype-initialised head.

    ``part`` is ``all`` or ``film`` (the trainable sets of
    :mod:`medmeta_common.models.factory`); the rest of the copy stays frozen.
    """
    tuned = copy.deepcopy(encoder).to(device).train()
    freeze_all_but(tuned, part)
    with torch.no_grad(), autocast(device, amp):
        start = tuned(images).float()
    head = CosineClassifier(start.shape[1], n_classes, scale).to(device)
    head.set_prototypes(prototypes(start, labels, n_classes))
    trained = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam([*trained, *head.parameters()], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        with autocast(device, amp):
            logits = head(tuned(images).float())
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
    return tuned.eval(), head


def _finetune_encoder_accuracy(encoder: torch.nn.Module, images: np.ndarray, episode: Episode,
                               steps: int, scale: float, device: torch.device, amp: bool, *,
                               lr: float, part: str) -> float:
    support = torch.from_numpy(images[episode.support]).to(device)
    labels = torch.as_tensor(episode.support_labels, device=device)
    with torch.enable_grad():
        tuned, head = finetune_encoder(encoder, support, labels, len(episode.classes), steps,
                                       scale, device, amp, lr=lr, part=part)
    with torch.no_grad(), autocast(device, amp):
        logits = head(tuned(torch.from_numpy(images[episode.query]).to(device)).float())
    return float((logits.argmax(dim=1).cpu().numpy() == episode.query_labels).mean())
