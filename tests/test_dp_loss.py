"""The DP loss is a sum of per-record terms: checked on Opacus' per-sample gradients.

Synthetic tensors suffice for the oracles (the property is about the loss and the
layers, not the pixels), so these tests run without ``../shared/data``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from client.tasks.classification import episode_loss, rotate_by
from medmeta_common.config import ImageConfig, ModelConfig
from medmeta_common.models.factory import build_encoder
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead
from medmeta_common.privacy.dp_sgd import BatchLoss, DPSettings, merge_rows, train_steps
from medmeta_common.privacy.sampling import Draw, PoissonSampler


def model(seed: int = 0, standardized: bool = False) -> EncoderWithHead:
    torch.manual_seed(seed)
    encoder = build_encoder(ModelConfig(weight_standardization=standardized),
                            ImageConfig(size=32), seed)
    return EncoderWithHead(encoder, CosineClassifier(encoder.embedding_dim, 4))


def batch(per_class: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images, ``per_class`` of each of 4 classes, interleaved."""
    generator = torch.Generator().manual_seed(7)
    coarse = torch.randn(4 * per_class, 1, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    return images, torch.arange(4 * per_class) % 4


def per_sample_grads(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     classes: np.ndarray) -> list[torch.Tensor]:
    gsm = GradSampleModule(net, loss_reduction="sum")
    net.zero_grad()
    episode_loss(gsm(images), classes, labels).backward()
    grads = [p.grad_sample.detach().clone() for p in net.parameters()]
    gsm.to_standard_module()
    return grads


def single_grads(net: torch.nn.Module, image: torch.Tensor, label: torch.Tensor,
                 classes: np.ndarray) -> list[torch.Tensor]:
    net.zero_grad()
    episode_loss(net(image[None]), classes, label[None]).backward()
    return [p.grad.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("standardized", [False, True])
def test_per_sample_gradients_are_the_gradients_of_each_record_alone(standardized: bool) -> None:
    """The oracle: record i's per-sample gradient is the gradient of record i alone
    (for weight-standardised convolutions this checks our own Opacus rule)."""
    import medmeta_common.privacy.grad_samplers  # noqa: F401 - registers our rule

    images, labels = batch()
    classes = np.arange(4)
    samples = per_sample_grads(model(standardized=standardized), images, labels, classes)
    assert all(float(s.abs().sum()) > 0 for s in samples)
    for i in (0, 5, 11):
        alone = single_grads(model(standardized=standardized), images[i], labels[i], classes)
        for sample, grad in zip(samples, alone, strict=True):
            torch.testing.assert_close(sample[i], grad, rtol=1e-4, atol=1e-5)
    reference = model(standardized=standardized)
    reference.zero_grad()
    episode_loss(reference(images), classes, labels).backward()
    for sample, param in zip(samples, reference.parameters(), strict=True):
        torch.testing.assert_close(sample.sum(0), param.grad, rtol=1e-4, atol=1e-5)


def test_changing_one_record_changes_only_its_gradient() -> None:
    images, labels = batch()
    classes = np.arange(4)
    before = per_sample_grads(model(), images, labels, classes)
    changed = images.clone()
    changed[3] = torch.flip(changed[3], dims=[-1]) * 2.0 + 0.5
    after = per_sample_grads(model(), changed, labels, classes)
    others = [i for i in range(len(images)) if i != 3]
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(b[others], a[others], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(b[3], a[3]) for b, a in zip(before, after, strict=True))


def empty_steps(noise: float) -> list[bool]:
    """Which parameters moved in 3 DP steps whose Poisson batches are all empty."""
    net = model()
    images, labels = batch()
    rate = 1e-12  # no record is ever drawn: every step is the noise-only step
    sampler = PoissonSampler(len(labels), sample_rate=rate, rng=np.random.default_rng(0),
                             labels=labels.numpy(), n_classes=4, ways=4)

    def loss(trained: torch.nn.Module, draw: Draw) -> BatchLoss:
        assert draw.classes is not None and len(draw.index) == 0
        return BatchLoss(episode_loss(trained(images[draw.index]), draw.classes,
                                      labels[draw.index]), 0)

    start = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    train_steps(net, optimizer, sampler, loss, steps=3, dp=DPSettings(noise, rate, 1.0),
                device=torch.device("cpu"))
    assert not any(getattr(p, "grad_sample", None) is not None for p in net.parameters())
    return [not torch.equal(a, b) for a, b in zip(start, net.parameters(), strict=True)]


def test_empty_batches_take_the_noise_step_on_every_parameter() -> None:
    assert all(empty_steps(noise=1.0))  # noise reaches every parameter...
    assert not any(empty_steps(noise=0.0))  # ...and it is the noise that moves them


def test_views_of_a_record_merge_into_one_per_record_gradient() -> None:
    """Augmentation multiplicity and rotation views: one gradient per record, then clip."""
    images, labels = batch(per_class=2)
    classes = np.arange(4)
    views = 4
    rows = images.repeat_interleave(views, dim=0)
    turns = torch.arange(len(rows)) % 4
    rows = rotate_by(rows, turns)

    def loss(net: EncoderWithHead, x: torch.Tensor, row_labels: torch.Tensor,
             row_turns: torch.Tensor) -> torch.Tensor:
        logits, rotation = net(x)
        return (episode_loss(logits, classes, row_labels)
                + torch.nn.functional.cross_entropy(rotation, row_turns, reduction="sum")) / views

    def with_rotation(seed: int = 0) -> EncoderWithHead:
        net = model(seed)
        torch.manual_seed(seed + 1)
        net.rotation = torch.nn.Linear(net.encoder.embedding_dim, 4)
        return net

    net = with_rotation()
    gsm = GradSampleModule(net, loss_reduction="sum")
    loss(gsm, rows, labels.repeat_interleave(views), turns).backward()  # type: ignore[arg-type]
    merge_rows(net, torch.arange(len(images)).repeat_interleave(views), len(images))
    merged = [p.grad_sample.detach().clone() for p in net.parameters()]
    gsm.to_standard_module()
    assert all(m.shape[0] == len(images) for m in merged)
    for i in (0, 5):  # oracle: record i's four views alone
        single = with_rotation()
        single.zero_grad()
        mine = slice(i * views, (i + 1) * views)
        loss(single, rows[mine], labels[i].repeat(views), turns[mine]).backward()
        for m, p in zip(merged, single.parameters(), strict=True):
            torch.testing.assert_close(m[i], p.grad, rtol=1e-4, atol=1e-5)
