"""The DP loss is a sum of per-record terms: checked on Opacus' per-sample gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from opacus import GradSampleModule

from client.train import DPSettings, episode_loss, train_cosine
from medmeta_common.config import DataConfig, ImageConfig, ModelConfig, TrainConfig
from medmeta_common.data.sources import load_site
from medmeta_common.models.factory import build_encoder
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead


def model(seed: int = 0) -> EncoderWithHead:
    torch.manual_seed(seed)
    encoder = build_encoder(ModelConfig(), ImageConfig(size=32), seed)
    return EncoderWithHead(encoder, CosineClassifier(encoder.embedding_dim, 4))


def real_batch(brain_npz: Path, per_class: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Real brain-MRI slices, ``per_class`` of each of the 4 classes, interleaved."""
    site = load_site(DataConfig(path=str(brain_npz), split="test"), ImageConfig(size=32))
    index = np.stack([np.flatnonzero(site.labels == c)[:per_class] for c in range(4)], 1).ravel()
    return torch.from_numpy(site.images[index]), torch.from_numpy(site.labels[index])


def per_sample_grads(net: EncoderWithHead, images: torch.Tensor, labels: torch.Tensor,
                     classes: np.ndarray) -> list[torch.Tensor]:
    gsm = GradSampleModule(net, loss_reduction="sum")
    net.zero_grad()
    episode_loss(gsm(images), classes, labels).backward()
    grads = [p.grad_sample.detach().clone() for p in net.parameters()]
    gsm._close()
    return grads


def test_per_sample_gradients_sum_to_the_batch_gradient(brain_npz: Path) -> None:
    images, labels = real_batch(brain_npz)
    classes = np.unique(labels.numpy())
    assert len(classes) == 4
    net = model()
    samples = per_sample_grads(net, images, labels, classes)
    assert all(float(s.abs().sum()) > 0 for s in samples)
    reference = model()
    reference.zero_grad()
    episode_loss(reference(images), classes, labels).backward()
    for sample, param in zip(samples, reference.parameters(), strict=True):
        torch.testing.assert_close(sample.sum(0), param.grad, rtol=1e-4, atol=1e-5)
    # ...and each per-sample gradient is the gradient of that record alone (the oracle).
    for i in (0, 5):
        single = model()
        single.zero_grad()
        episode_loss(single(images[i : i + 1]), classes, labels[i : i + 1]).backward()
        for sample, param in zip(samples, single.parameters(), strict=True):
            torch.testing.assert_close(sample[i], param.grad, rtol=1e-4, atol=1e-5)


def test_changing_one_record_changes_only_its_gradient(brain_npz: Path) -> None:
    images, labels = real_batch(brain_npz)
    classes = np.unique(labels.numpy())
    before = per_sample_grads(model(), images, labels, classes)
    changed = images.clone()
    changed[3] = torch.flip(changed[3], dims=[-1]) * 2.0 + 0.5
    after = per_sample_grads(model(), changed, labels, classes)
    others = [i for i in range(len(images)) if i != 3]
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(b[others], a[others], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(b[3], a[3]) for b, a in zip(before, after, strict=True))


def test_dp_round_runs_with_empty_batches(brain_npz: Path) -> None:
    site = load_site(DataConfig(path=str(brain_npz), split="test"), ImageConfig(size=32))
    site = site.subset(np.arange(40))
    net = model()
    start = [p.detach().clone() for p in net.encoder.parameters()]
    stats = train_cosine(net, site, TrainConfig(local_steps=5, batch_size=1, augment=True),
                         dp=DPSettings(noise_multiplier=1.0, sample_rate=0.02, max_grad_norm=1.0),
                         sample_rate=0.02, seed=0, device=torch.device("cpu"))
    assert stats.steps == 5
    moved = [not torch.equal(a, b) for a, b in zip(start, net.encoder.parameters(), strict=True)]
    assert all(moved)  # noise reaches every parameter, even in empty steps
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None
                   for p in net.parameters())
