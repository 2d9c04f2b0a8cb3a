"""Patient-level privacy: patients are sampled, and one patient's images are clipped as one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from client.round import local_training
from client.tasks import get_task
from medmeta_common.config import DataConfig, ImageConfig, ModelConfig, TrainConfig
from medmeta_common.data.records import SiteData
from medmeta_common.data.sources import load_site
from medmeta_common.models.factory import build_encoder
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead
from medmeta_common.privacy.dp_sgd import DPSettings
from medmeta_common.privacy.sampling import PoissonSampler


def test_patients_are_sampled_whole_at_the_stated_rate() -> None:
    groups = np.repeat([f"p{i}" for i in range(60)], np.arange(60) % 7 + 1)
    labels = np.arange(len(groups)) % 3
    sampler = PoissonSampler(len(labels), labels=labels, n_classes=3, ways=3, sample_rate=0.2,
                             rng=np.random.default_rng(0), units=groups)
    hits = np.zeros(60)
    for _ in range(3000):
        index = sampler.sample().index
        present = np.unique(groups[index])
        for patient in present:  # all of a sampled patient's records come together
            assert (groups[index] == patient).sum() == (groups == patient).sum()
        hits[[int(p[1:]) for p in present]] += 1
    assert hits.mean() / 3000 == pytest.approx(0.2, abs=0.01)
    assert sampler.expected_batch_size() == pytest.approx(0.2 * 60)


def one_patient_site(brain_npz: Path, images: int = 40) -> SiteData:
    site = load_site(DataConfig(path=str(brain_npz), split="test"), ImageConfig(size=32))
    index = np.flatnonzero(site.labels == 0)[:images]
    return SiteData(images=site.images[index], labels=np.zeros(images, dtype=np.int64),
                    classes=("only",), groups=np.array(["P1"] * images),
                    refs=tuple(site.refs[i] for i in index))


def update_sum_norm(site: SiteData, unit: str, clip: float) -> float:
    """Norm of the clipped gradient sum of one noiseless step (update * E / lr)."""
    torch.manual_seed(0)
    encoder = build_encoder(ModelConfig(), ImageConfig(size=32), 0)
    model = EncoderWithHead(encoder, CosineClassifier(encoder.embedding_dim, 2))
    before = [p.detach().clone() for p in model.parameters()]
    site = SiteData(site.images, site.labels, ("only", "other"), site.groups, site.refs)
    train = TrainConfig(local_steps=1, ways=2, batch_size=len(site), lr=1.0, momentum=0.0,
                        augment=False)
    units = get_task("classification").privacy_units(site, unit, source="test")
    local_training(get_task("classification"), model, site, train,
                   dp=DPSettings(0.0, 1.0, clip, unit), seed=0, device=torch.device("cpu"),
                   amp=False, units=units)
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum()
                           for p, b in zip(model.parameters(), before, strict=True)))
    units = len(np.unique(site.groups)) if unit == "patient" else len(site.labels)
    return float(delta) * units  # E = q * ways / n_classes * units = units here


def test_a_patient_with_many_images_moves_the_update_at_most_the_clip_bound(
        brain_npz: Path) -> None:
    site = one_patient_site(brain_npz)
    clip = 0.05
    assert update_sum_norm(site, "patient", clip) <= clip * (1 + 1e-4)
    # Per image, the same patient contributes up to 40 clipped gradients.
    assert update_sum_norm(site, "image", clip) > 10 * clip
