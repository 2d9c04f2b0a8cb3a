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
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.models.factory import build_encoder, freeze_all_but
from medmeta_common.models.heads import CosineClassifier, EncoderWithHead
from medmeta_common.privacy.dp_sgd import DPSettings
from medmeta_common.progress import track
from server.state import RunState


@dataclass(frozen=True)
class Federated:
    """A finished federation: its final encoder and its per-round train records."""

    encoder: SharedEncoder
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
                      device: str = "cpu", dp: DPSettings | None = None) -> SharedEncoder:
    """Training on the pooled data of all sites, with the federation's recipe.

    Non-private (``dp=None``) it is the upper bound; with ``dp`` it is record-level
    DP-SGD on the pooled data (the rate must be the plan's, :func:`pooled_rate`).
    """
    data = pooled_training_data(config, state_root)
    encoder = build_encoder(config.model, config.image, config.seed)
    freeze_all_but(encoder, config.train.trainable)
    unused = set(encoder.unused_by("embedding"))
    for name, param in encoder.named_parameters():
        if name in unused:
            param.requires_grad_(False)
    head = CosineClassifier(encoder.embedding_dim, len(data.classes), config.model.cosine_scale)
    train = replace(config.train, local_steps=steps, ways=None)
    local_training(get_task("classification"), EncoderWithHead(encoder, head), data, train,
                   dp=dp, seed=config.seed, device=torch.device(device),
                   amp=config.runtime.amp, units=None)
    return encoder.cpu().eval()


def pooled_rate(config: FederationConfig, state_root: Path) -> tuple[float, int]:
    """The Poisson rate of ``train.batch_size`` on the pooled data, and its size."""
    data = pooled_training_data(config, state_root)
    plan = get_task("classification").sampling(data, replace(config.train, ways=None))
    return plan.rate, len(data)


# --- Held-out few-shot scenarios ---------------------------------------------------------

Split = Literal["train", "val", "test"]
BLOOD_NEW = ("erythroblast", "lymphocyte", "platelet")
SCENARIOS = ("brain-shift", "blood-new", "breast")
WAYS = {"brain-shift": 4, "blood-new": 3, "breast": 2}


BRAIN_NPZ = Path("brain_tumor_mri") / "brain_tumor_mri_64.npz"
BRAIN_PART_FILE = "brain_train_part{index}.npz"
# Correlation of two slices (16x16 means, z-normalised) above which they are the same
# image (duplicates) and above which they are kept together as one pseudo-patient.
DUPLICATE, SAME_PATIENT = 0.99, 0.98
BRAIN_PARTS, BRAIN_VALIDATION_PART = 3, 2


def _thumbnails(images: np.ndarray) -> torch.Tensor:
    """16x16 average-pooled, z-normalised slices as unit vectors (for correlations)."""
    small = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(images.astype(np.float32))[:, None], 16).flatten(1)
    small = small - small.mean(dim=1, keepdim=True)
    return small / small.norm(dim=1, keepdim=True).clamp(min=1e-6)


def pseudo_patients(images: np.ndarray, threshold: float = SAME_PATIENT) -> np.ndarray:
    """Group ids: slices linked by a correlation above ``threshold``, kept together.

    The brain MRI set names no patients; its slices of one patient are near-duplicates
    of each other, so single-linkage clusters of near-duplicates stand in for patients
    (at 0.98 the largest holds 9 slices: no runaway chaining).
    """
    thumbs = _thumbnails(images)
    parent = np.arange(len(images))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    close = torch.triu(thumbs @ thumbs.T > threshold, diagonal=1).nonzero().tolist()
    for a, b in close:
        parent[root(a)] = root(b)
    return np.array([f"pseudo-{root(i)}" for i in range(len(images))])


def brain_part_file(data_dir: Path, folder: Path, index: int) -> Path:
    """One of three pseudo-patient parts of the brain training slices, as an .npz.

    Two thirds of this brain set's test slices are exact copies of training slices
    (all the ``no_tumor`` ones): a site that trained on those would have seen the
    held-out patients. So every training slice that duplicates a test slice is left
    out, and the rest is grouped into pseudo-patients (:func:`pseudo_patients`) and dealt
    into three parts that never cut one: parts 0 and 1 are the brain sites' (whatever
    classes each then keeps), part 2 (``BRAIN_VALIDATION_PART``) the validation scenario.
    """
    path = folder / BRAIN_PART_FILE.format(index=index)
    if path.exists():
        return path
    from medmeta_common.data.splits import partition_by_group

    with np.load(data_dir / BRAIN_NPZ) as raw:
        images, labels = raw["train_images"], raw["train_labels"]
        test, classes = raw["test_images"], raw["classes"]
    copies = (_thumbnails(images) @ _thumbnails(test).T).max(dim=1).values > DUPLICATE
    kept = np.flatnonzero(~copies.numpy())
    groups = pseudo_patients(images[kept])
    for part in range(BRAIN_PARTS):
        mine = kept[partition_by_group(groups, BRAIN_PARTS, part, seed=0)]
        np.savez(folder / BRAIN_PART_FILE.format(index=part), images=images[mine],
                 labels=labels[mine], classes=classes,
                 groups=groups[np.searchsorted(kept, mine)])
    return path


def benchmark_sites(config: FederationConfig, data_dir: Path, folder: Path
                    ) -> FederationConfig:
    """``config`` with each brain site reading its pseudo-patient part (same classes).

    A brain site's ``partition.index`` names its part; the parts are cut before any
    site selects its classes, so no site holds a validation pseudo-patient.
    """
    sites = []
    for site in config.sites:
        if Path(site.data.path).name == BRAIN_NPZ.name:
            index = site.data.partition.index if site.data.partition else 0
            if index == BRAIN_VALIDATION_PART:
                raise ValueError(f"site {site.name}: part {index} is the validation part")
            path = str(brain_part_file(data_dir, folder, index))
            site = replace(site, data=replace(site.data, path=path, split=None,
                                              group_key="groups", partition=None))
        sites.append(site)
    return replace(config, sites=tuple(sites))


def shifted_brain(data_dir: Path, split: str, folder: Path) -> Path:
    """Brain slices of no training site, through a simulated scanner change (an .npz).

    ``test``: the test split. ``val``: the third pseudo-patient part of the sites' file,
    which no training site holds (``BRAIN_VALIDATION_PART``).
    """
    if split == "test":
        with np.load(data_dir / BRAIN_NPZ) as raw:
            classes, images, labels = raw["classes"], raw["test_images"], raw["test_labels"]
    else:
        with np.load(brain_part_file(data_dir, folder, BRAIN_VALIDATION_PART)) as raw:
            classes, images, labels = raw["classes"], raw["images"], raw["labels"]
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
             finetune: str = "head", finetune_lr: float | None = None,
             max_episodes: int | None = None) -> dict[str, dict]:
    """Accuracy per scenario and K (same seeded episodes for every encoder)."""
    results: dict[str, dict] = {name: {} for name in scenarios}
    runs = [(name, site, k) for name, site in scenarios.items() for k in shots]
    for name, site, k in track(runs, "benchmark evaluations"):
        fewshot = FewShotConfig(ways=WAYS[name], shots=k, queries=15,
                                episodes=min(episodes, max_episodes or episodes),
                                finetune_steps=finetune_steps, finetune_lr=finetune_lr)
        r = evaluate_fewshot(encoder, site.images, site.labels, len(site.classes), fewshot,
                             seed=1234, device=torch.device("cpu"),
                             finetune=finetune,  # type: ignore[arg-type]
                             scale=config.model.cosine_scale)
        results[name][str(k)] = {"mean": r.accuracy_mean, "ci95": r.accuracy_ci95,
                                 "episodes": r.episodes, "accuracies": list(r.accuracies)}
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
