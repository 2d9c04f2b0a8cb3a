"""The site's mechanism as ``medmeta privacy audit`` runs it (classification).

The audit (:mod:`medmeta_common.privacy.canary_audit`) trains the method's real
DP-SGD step once — the classification task's per-record loss in the one local
training loop, :func:`client.round.local_training`, with the same sampler — and
scores each canary by minus its loss under its label. The learning rate is raised to
at least ``AUDIT_LR`` and augmentation is off: the guarantee holds for any learning
rate or augmentation, and these settings make canaries easier to memorise, so the
test is stronger, not weaker.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from client.round import local_training
from client.tasks import get_task
from client.tasks.classification import poisson_rate_for
from medmeta_common.config import ImageConfig, ModelConfig, TrainConfig
from medmeta_common.data.records import SiteData
from medmeta_common.models.factory import build_encoder, freeze_all_but
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead
from medmeta_common.privacy.canary_audit import AuditedMechanism
from medmeta_common.privacy.dp_sgd import DPSettings

AUDIT_LR = 0.1


def classification_mechanism(image: ImageConfig, model: ModelConfig, train: TrainConfig, *,
                             steps: int, max_grad_norm: float) -> AuditedMechanism:
    """The method's training of the encoder's trainable set and a head, for ``steps`` steps.

    The encoder starts where a federation does (its prior, or a random init with
    ``model.weights: none``) and trains only ``train.trainable``, as a site round does.
    """
    train = replace(train, local_steps=steps, lr=max(train.lr, AUDIT_LR), augment=False)
    device = torch.device("cpu")

    def train_and_score(data: SiteData, dp: DPSettings | None, canaries: SiteData,
                        seed: int) -> np.ndarray:
        encoder = build_encoder(model, image, seed)
        freeze_all_but(encoder, train.trainable)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head = CosineClassifier(encoder.embedding_dim, len(data.classes), model.cosine_scale)
        net = EncoderWithHead(encoder, head)
        local_training(get_task("classification"), net, data, train, dp=dp, seed=seed,
                       device=device, amp=False, units=None)
        with torch.no_grad():
            logits = net.eval()(torch.from_numpy(canaries.images))
            losses = F.cross_entropy(logits, torch.from_numpy(canaries.labels),
                                     reduction="none")
        return -losses.numpy()

    return AuditedMechanism(
        sample_rate=lambda data: poisson_rate_for(train, len(data), len(data.classes)),
        steps=steps, max_grad_norm=max_grad_norm, train_and_score=train_and_score)
