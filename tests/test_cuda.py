"""The GPU path: DP training, evaluation and fine-tuning on CUDA with mixed precision.

Skipped (with the reason) on machines without a CUDA GPU; CI has none, so these run
on a GPU machine by hand (see benchmarks/RESULTS.md for the last run).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.fewshot import evaluate_fewshot, finetune_encoder
from client.round import local_training
from client.tasks import get_task
from medmeta_common.config import DataConfig, FewShotConfig, ImageConfig, ModelConfig, TrainConfig
from medmeta_common.data.sources import load_site
from medmeta_common.device import pick_device
from medmeta_common.models.factory import build_encoder
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead
from medmeta_common.privacy.dp_sgd import DPSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")

IMAGE = ImageConfig(size=32)


def demo(name: str = "site-0"):
    return load_site(DataConfig(path=f"builtin:demo/{name}", split=None), IMAGE)


def test_auto_picks_the_gpu() -> None:
    assert pick_device("auto").type == "cuda"


@pytest.mark.parametrize("amp", [False, True])
def test_dp_training_on_cuda(amp: bool) -> None:
    site = demo()
    encoder = build_encoder(ModelConfig(), IMAGE, seed=0)
    model = EncoderWithHead(encoder, CosineClassifier(encoder.embedding_dim, len(site.classes)))
    before = [p.detach().clone() for p in model.parameters()]
    task = get_task("classification")
    train = TrainConfig(local_steps=10, batch_size=32)
    rate = task.sampling(site, train).rate
    stats = local_training(task, model, site, train, dp=DPSettings(1.0, rate, 1.0), seed=0,
                           device=torch.device("cuda"), amp=amp, units=None)
    assert stats.steps == 10
    after = list(model.parameters())
    assert all(p.device.type == "cuda" and torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a.cpu(), b) for a, b in zip(after, before, strict=True))


def test_gpu_and_cpu_evaluation_agree() -> None:
    site = demo("site-3")
    encoder = build_encoder(ModelConfig(), IMAGE, seed=0)
    fewshot = FewShotConfig(ways=4, shots=5, queries=10, episodes=20)
    cpu = evaluate_fewshot(encoder, site.images, site.labels, 4, fewshot, seed=0,
                           device=torch.device("cpu"))
    gpu = evaluate_fewshot(encoder.cuda(), site.images, site.labels, 4, fewshot, seed=0,
                           device=torch.device("cuda"))
    assert gpu.accuracy_mean == pytest.approx(cpu.accuracy_mean, abs=0.02)


def test_finetune_encoder_on_cuda_with_amp() -> None:
    site = demo("site-3")
    encoder = build_encoder(ModelConfig(), IMAGE, seed=0).cuda()
    images = torch.from_numpy(site.images[:40]).cuda()
    labels = torch.from_numpy(site.labels[:40]).cuda()
    tuned, head = finetune_encoder(encoder, images, labels, 4, steps=5, scale=10.0,
                               device=torch.device("cuda"), amp=True)
    assert next(tuned.parameters()).device.type == "cuda"
    assert np.isfinite(head.weight.detach().cpu().numpy()).all()
