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


def model(seed: int = 0, standardized: bool = False) -> EncoderWithHead:
    torch.manual_seed(seed)
    encoder = build_encoder(ModelConfig(weight_standardization=standardized),
                            ImageConfig(size=32), seed)
    return EncoderWithHead(encoder, CosineClassifier(encoder.embedding_dim, 4))


def real_batch(brain_npz: Path, per_class: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Real brain-MRI slices, ``per_class`` of each of the 4 classes, interleaved."""
    site = load_site(DataConfig(path=str(brain_npz), split="test"), ImageConfig(size=32))
    index = np.stack([np.flatnonzero(site.labels == c)[:per_class] for c in range(4)], 1).ravel()
    return torch.from_numpy(site.images[index]), torch.from_numpy(site.labels[index])


def test_weight_standardized_encoder_per_sample_gradients(brain_npz: Path) -> None:
    """Our Opacus rule for standardised convolutions matches single-record gradients."""
    import medmeta_common.privacy.grad_samplers  # noqa: F401
    images, labels = real_batch(brain_npz, per_class=2)
    classes = np.unique(labels.numpy())
    samples = per_sample_grads(model(standardized=True), images, labels, classes)
    for i in (1, 6):
        single = model(standardized=True)
        single.zero_grad()
        episode_loss(single(images[i : i + 1]), classes, labels[i : i + 1]).backward()
        for sample, param in zip(samples, single.parameters(), strict=True):
            torch.testing.assert_close(sample[i], param.grad, rtol=1e-4, atol=1e-5)


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


def test_views_of_a_record_merge_into_one_per_record_gradient(brain_npz: Path) -> None:
    """Augmentation multiplicity and rotation views: one gradient per record, then clip."""
    from client.train import _merge_rows, rotate_by

    images, labels = real_batch(brain_npz, per_class=2)
    classes = np.unique(labels.numpy())
    views = 4
    batch = images.repeat_interleave(views, dim=0)
    turns = torch.arange(len(batch)) % 4
    batch = rotate_by(batch, turns)

    def loss(net: EncoderWithHead, rows: torch.Tensor, row_labels: torch.Tensor,
             row_turns: torch.Tensor) -> torch.Tensor:
        logits, rotation = net(rows)
        return (episode_loss(logits, classes, row_labels)
                + torch.nn.functional.cross_entropy(rotation, row_turns, reduction="sum")) / views

    def with_rotation(seed: int = 0) -> EncoderWithHead:
        net = model(seed)
        torch.manual_seed(seed + 1)
        net.rotation = torch.nn.Linear(net.encoder.embedding_dim, 4)
        return net

    net = with_rotation()
    gsm = GradSampleModule(net, loss_reduction="sum")
    loss(gsm, batch, labels.repeat_interleave(views), turns).backward()
    _merge_rows(net, torch.arange(len(images)).repeat_interleave(views), len(images))
    merged = [p.grad_sample.detach().clone() for p in net.parameters()]
    gsm._close()
    assert all(m.shape[0] == len(images) for m in merged)
    for i in (0, 5):  # oracle: record i's four views alone
        single = with_rotation()
        single.zero_grad()
        rows = slice(i * views, (i + 1) * views)
        loss(single, batch[rows], labels[i].repeat(views), turns[rows]).backward()
        for m, p in zip(merged, single.parameters(), strict=True):
            torch.testing.assert_close(m[i], p.grad, rtol=1e-4, atol=1e-5)
