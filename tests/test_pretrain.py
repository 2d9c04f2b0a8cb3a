"""The data-free prior: pretrained on synthetic images only, then the federation's start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from client.meta_model import load_meta_model
from medmeta.simulate import run_simulation
from medmeta_common.config import load_config
from medmeta_common.models.efficientnet import EfficientNetLite0, FrozenStatistics
from medmeta_common.models.prior import file_sha256
from server.pretrain import PretrainSettings, synthetic_set

FEDERATION = """
name: synthetic-prior
rounds: 1
image: {{size: 32, channels: 3, intensity: minmax}}
model: {{backbone: efficientnet_lite0, weights: {weights}}}
train: {{local_steps: 2, batch_size: 8, trainable: film}}
privacy: {{enabled: false}}
evaluation: {{ways: 2, shots: 2, queries: 3, episodes: 2}}
sites:
  - name: a
    data: {{path: "builtin:demo/site-0", split: null}}
  - name: b
    data: {{path: "builtin:demo/site-1", split: null}}
"""


def test_synthetic_images_are_images_of_their_style() -> None:
    images, labels = synthetic_set(PretrainSettings(images=40, classes=4, size=32))
    assert images.shape == (40, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert np.bincount(labels).tolist() == [10, 10, 10, 10]
    means = np.stack([images[labels == c].mean(axis=(0, 2, 3)) for c in range(4)])
    assert np.ptp(means, axis=0).max() > 0.05  # the styles differ in colour


@pytest.mark.slow
def test_pretrain_writes_a_prior_the_federation_starts_from(tmp_path: Path) -> None:
    prior = tmp_path / "synthetic.pt"
    result = subprocess.run(
        [sys.executable, "-m", "medmeta.cli", "pretrain", "--synthetic", "--out", str(prior),
         "--steps", "4", "--images", "48", "--classes", "3", "--size", "32",
         "--batch-size", "8"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    sha = file_sha256(prior)
    assert sha in result.stdout
    assert json.loads(prior.with_suffix(".json").read_text())["sha256"] == sha
    model = EfficientNetLite0()
    model.load_state_dict(torch.load(prior, weights_only=True))
    stats = [m for m in model.modules() if isinstance(m, FrozenStatistics)]
    assert any(not torch.equal(s.running_var, torch.ones_like(s.running_var))  # type: ignore[arg-type]
               for s in stats)  # BatchNorm statistics learned on synthetic images, frozen
    again = subprocess.run([sys.executable, "-m", "medmeta.cli", "pretrain", "--synthetic",
                            "--out", str(prior), "--steps", "1"], capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr  # never overwritten silently

    config_path = tmp_path / "federation.yaml"
    config_path.write_text(FEDERATION.format(weights=prior.name))  # relative to the YAML
    config = load_config(config_path)
    assert config.model.weights == str(prior)
    run_simulation(config, tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "round-0001.pt",
                            weights_only=True)
    assert checkpoint["prior"]["sha256"] == sha
    assert all(".film." in name for name in checkpoint["encoder"])  # only FiLM travelled
    assert (tmp_path / "run" / "priors" / f"{sha}.pt").exists()  # sites found it by hash
    meta = load_meta_model(tmp_path / "run")  # a new site: the prior, then the FiLM
    frozen = dict(meta.encoder.named_parameters())["stages.0.0.depthwise.0.1.weight"]
    assert torch.equal(frozen, model.stages[0][0].depthwise[0][1].weight)  # type: ignore[index]
