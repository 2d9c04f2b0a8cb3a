"""What the benchmarks share: in-process federations, pooled training, held-out scenarios.

Every federation here is the real thing — :func:`medmeta.simulate.run_simulation`,
the real Strategy and ClientApp through the in-process Grid — run into a scratch
folder; its final encoder and per-round records are read back from the run's own
checkpoint and metrics. The held-out few-shot scenarios are built from
``../shared/data`` (``benchmarks/README`` and ``docs/method.md`` say which choices
were made on which split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from client.fewshot import evaluate_fewshot
from client.meta_model import load_meta_model
from client.round import local_training
from client.site import site_splits
from client.tasks import get_task
from medmeta.inprocess import Mod
from medmeta.simulate import SimulatedSites, run_simulation
from medmeta_common.config import DataConfig, FederationConfig, FewShotConfig
from medmeta_common.data.records import SiteData
from medmeta_common.models.encoder import Encoder
from medmeta_common.models.factory import build_encoder
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead
from medmeta_common.progress import track
from server.state import RunState


@dataclass(frozen=True)
class Federated:
    """A finished federation: its final encoder and its per-round train records."""

    encoder: Encoder
    rounds: list[dict[str, Any]]


def federate(config: FederationConfig, out: Path, *, device: str = "cpu",
             mods: Mapping[str, Sequence[Mod]] | None = None) -> Federated:
    """Run ``config`` into ``out`` (sites train one after another on all threads)."""
    runtime = replace(config.runtime, device=device,  # type: ignore[arg-type]
                      cpus_per_site=float(max(1, torch.get_num_threads())))
    run_simulation(replace(config, runtime=runtime), out, mods=mods)
    records = [r for r in RunState(out).read_metrics() if r.get("phase") == "train"]
    return Federated(load_meta_model(out).encoder, records)


def pooled_training_data(config: FederationConfig, state_root: Path) -> SiteData:
    """All sites' training records in one set, each site's classes kept distinct."""
    sites = SimulatedSites(config, state_root)
    parts, offset, classes = [], 0, []
    from flwr.app import Context, RecordDict

    for index in range(len(config.sites)):
        site = sites(Context(0, 0, {"partition-id": index}, RecordDict(), {}))
        train = site_splits(site, config.image, config.seed).train
        parts.append(replace(train, labels=train.labels + offset))
        classes += [f"{site.name}/{c}" for c in train.classes]
        offset += len(train.classes)
    return SiteData(images=np.concatenate([p.images for p in parts]),
                    labels=np.concatenate([p.labels for p in parts]), classes=tuple(classes),
                    groups=np.concatenate([p.groups for p in parts]),
                    refs=tuple(r for p in parts for r in p.refs))


def train_centralized(config: FederationConfig, state_root: Path, *, steps: int,
                      device: str = "cpu") -> Encoder:
    """Non-private training on the pooled data (the upper bound), same recipe otherwise."""
    data = pooled_training_data(config, state_root)
    encoder = build_encoder(config.model, config.image, config.seed)
    head = CosineClassifier(encoder.embedding_dim, len(data.classes), config.model.cosine_scale)
    train = replace(config.train, local_steps=steps, ways=None)
    local_training(get_task("classification"), EncoderWithHead(encoder, head), data, train,
                   dp=None, seed=config.seed, device=torch.device(device),
                   amp=config.runtime.amp, units=None)
    return encoder.cpu().eval()


# --- Held-out few-shot scenarios ---------------------------------------------------------

Split = Literal["train", "val", "test"]
BLOOD_NEW = ("erythroblast", "lymphocyte", "platelet")
SCENARIOS = ("brain-shift", "blood-new", "breast")
WAYS = {"brain-shift": 4, "blood-new": 3, "breast": 2}


def shifted_brain(data_dir: Path, split: str, folder: Path) -> Path:
    """Brain slices of no training site, through a simulated scanner change (an .npz)."""
    with np.load(data_dir / "brain_tumor_mri" / "brain_tumor_mri_64.npz") as raw:
        classes = raw["classes"]
        if split == "test":
            images, labels = raw["test_images"], raw["test_labels"]
        else:  # the third partition of the training split: no site trains on it
            from medmeta_common.data.splits import partition_by_group

            refs = [f"brain_tumor_mri_64.npz:train[{i}]" for i in range(len(raw["train_labels"]))]
            keep = partition_by_group(refs, 3, 2, seed=0)
            images, labels = raw["train_images"][keep], raw["train_labels"][keep]
    rng = np.random.default_rng(0)
    x = images.astype(np.float32) / 255.0
    x = np.stack([gaussian_filter(img, 0.8) for img in x]) ** 0.6
    x = np.clip(x + rng.normal(scale=0.04, size=x.shape), 0, 1)
    path = folder / f"brain_shift_{split}.npz"
    np.savez(path, test_images=(x * 255).astype(np.uint8), test_labels=labels, classes=classes)
    return path


def scenario_data(data_dir: Path, split: Split, folder: Path) -> dict[str, DataConfig]:
    """Where each held-out scenario's images are."""
    return {
        "brain-shift": DataConfig(path=str(shifted_brain(data_dir, split, folder)), split="test"),
        "blood-new": DataConfig(path=str(data_dir / "pbc_blood" / "pbc_blood_5class_28.npz"),
                                split=split, classes=BLOOD_NEW),
        "breast": DataConfig(path=str(data_dir / "medmnist" / "breastmnist_28.npz"), split=split),
    }


def evaluate(encoder: torch.nn.Module, config: FederationConfig, scenarios: dict[str, Any],
             shots: list[int], episodes: int, *, finetune_steps: int = 0,
             finetune: str = "head", max_episodes: int | None = None) -> dict[str, dict]:
    """Accuracy per scenario and K (same seeded episodes for every encoder)."""
    results: dict[str, dict] = {name: {} for name in scenarios}
    runs = [(name, site, k) for name, site in scenarios.items() for k in shots]
    for name, site, k in track(runs, "benchmark evaluations"):
        fewshot = FewShotConfig(ways=WAYS[name], shots=k, queries=15,
                                episodes=min(episodes, max_episodes or episodes),
                                finetune_steps=finetune_steps)
        r = evaluate_fewshot(encoder, site.images, site.labels, len(site.classes), fewshot,
                             seed=1234, device=torch.device("cpu"),
                             finetune=finetune,  # type: ignore[arg-type]
                             scale=config.model.cosine_scale)
        results[name][str(k)] = {"mean": r.accuracy_mean, "ci95": r.accuracy_ci95,
                                 "episodes": r.episodes}
    return results


# --- Hostile sites: the five-site demo federation of the robustness benchmark -------------

# name, demo site, half (None: the whole site)
ROBUST_SITES: tuple[tuple[str, str, int | None], ...] = (
    ("a0", "site-0", 0), ("b0", "site-1", 0), ("c", "site-2", None),
    ("a1", "site-0", 1), ("b1", "site-1", 1),
)
HOSTILE_ORDER = ("b1", "a1")
HELD_OUT = "builtin:demo/site-3"
HELD_OUT_FEWSHOT = FewShotConfig(ways=4, shots=5, queries=15, episodes=200)
EPISODE_SEED = 1234


def robust_federation(*, rounds: int = 4, local_steps: int = 20, dp: bool = False,
                      server: dict[str, Any] | None = None) -> FederationConfig:
    """The five-site demo federation, with ``server`` settings over the defaults."""
    from medmeta_common.config.typed import build

    sites = []
    for name, demo, half in ROBUST_SITES:
        data: dict[str, Any] = {"path": f"builtin:demo/{demo}", "split": None}
        if half is not None:
            data["partition"] = {"parts": 2, "index": half}
        sites.append({"name": name, "data": data})
    raw = {"name": "robust", "seed": 0, "rounds": rounds,
           "train": {"local_steps": local_steps, "batch_size": 32, "lr": 0.03},
           "privacy": {"enabled": dp, "epsilon": 8.0},
           "server": {"min_sites": 2, **(server or {})}, "sites": sites}
    return build(FederationConfig, raw, source="medmeta.benchmarking")


def hostile_sites(count: int) -> tuple[str, ...]:
    """The first ``count`` hostile sites (``b1``, then ``a1``)."""
    if not 0 <= count <= len(HOSTILE_ORDER):
        raise ValueError(f"hostile site count must be in [0, {len(HOSTILE_ORDER)}], not {count}")
    return HOSTILE_ORDER[:count]


def held_out_data(config: FederationConfig) -> SiteData:
    """The held-out demo site's images, harmonised like the federation's."""
    from medmeta_common.data.sources import load_site

    return load_site(DataConfig(path=HELD_OUT, split=None), config.image)


def held_out_accuracy(encoder: torch.nn.Module, data: SiteData, *,
                      fewshot: FewShotConfig = HELD_OUT_FEWSHOT) -> Any:
    """Prototype few-shot accuracy on the held-out site (same seeded episodes each call)."""
    return evaluate_fewshot(encoder, data.images, data.labels, len(data.classes), fewshot,
                            seed=EPISODE_SEED, device=torch.device("cpu"))


def attacked(config: FederationConfig, out: Path, attack: str | None, count: int) -> Federated:
    """``config`` trained with ``count`` sites sending ``attack`` (``None``: all honest)."""
    from medmeta.attacks import hostile_site

    mods = {site: [hostile_site(attack)] for site in hostile_sites(count)} if attack else None
    return federate(config, out, mods=mods)
