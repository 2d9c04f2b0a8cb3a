"""Few-shot accuracy at sites the federation never saw, against four baselines.

Methods (each adapted the same way: class prototypes from K support images per class,
queries by cosine similarity, the same seeded episodes for every method):

  (a) untrained   the encoder at initialisation
  (b) scratch     a new encoder trained on the episode's K-shot support set alone
  (c) fedavg      FedAvg pre-training of the same model, same sites, rounds and epsilon
  (d) central     non-private training on the pooled data of all sites (upper bound)
  (e) medmeta     the shipped method (configs/benchmark.yaml) at epsilon 1, 4, 8, inf

Held-out scenarios (no site trains on them):

  1 brain-shift   brain MRI of patients no site has, through a simulated scanner change:
                  contrast curve (gamma 0.6), blur (sigma 0.8 px) and noise (sd 4% of
                  range) applied to the raw 8-bit slices; 4-way
  2 blood-new     blood-cell classes no site has (erythroblast, lymphocyte, platelet); 3-way
  3 breast        breast ultrasound, a modality no site has; 2-way

Choices are made on validation data (``--split val``: brain slices of a third training
partition, the PBC and BreastMNIST validation splits); the table uses ``--split test``.

    python benchmarks/fewshot.py --quick                 # CI-sized check, ~2 min
    python benchmarks/fewshot.py --split test --out benchmarks/fewshot_test.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.federation import run_centralized, run_inprocess
from client.fewshot import evaluate_fewshot
from medmeta_common.config import DataConfig, FederationConfig, FewShotConfig, load_config
from medmeta_common.config.typed import build
from medmeta_common.data.sources import load_site
from medmeta_common.models.factory import build_encoder

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")

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


def scenario_data(data_dir: Path, split: str, folder: Path) -> dict[str, DataConfig]:
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
    results: dict[str, dict] = {}
    for name, site in scenarios.items():
        results[name] = {}
        for k in shots:
            fewshot = FewShotConfig(ways=WAYS[name], shots=k, queries=15,
                                    episodes=min(episodes, max_episodes or episodes),
                                    finetune_steps=finetune_steps)
            r = evaluate_fewshot(encoder, site.images, site.labels, len(site.classes), fewshot,
                                 seed=1234, device=torch.device("cpu"), finetune=finetune,
                                 scale=config.model.cosine_scale)
            results[name][str(k)] = {"mean": r.accuracy_mean, "ci95": r.accuracy_ci95,
                                     "episodes": r.episodes}
    return results


def done_results(files: list[Path], split: str) -> dict[str, dict]:
    """Figures already measured in earlier runs of the same split (resume and merge)."""
    results: dict[str, dict] = {}
    for file in files:
        if not file.exists():
            continue
        earlier = json.loads(file.read_text())
        if earlier.get("split") != split:
            raise SystemExit(f"{file}: figures of split {earlier.get('split')!r}, "
                             f"not {split!r}; refusing to mix them")
        results.update(earlier["results"])
    return results


def method_configs(base: FederationConfig, epsilons: list[float]) -> dict[str, FederationConfig]:
    """FedAvg and medmeta variants of the benchmark federation."""
    # Plain FedAvg as usually deployed: local SGD lr 0.1, momentum 0.9, plain convolutions,
    # server averaging (meta-lr 1); same model, sites, rounds, batch and epsilon.
    fedavg = replace(base, model=replace(base.model, weight_standardization=False),
                     train=replace(base.train, local_steps=20, batch_size=64, lr=0.1,
                                   momentum=0.9, augment=True, augment_multiplicity=1,
                                   head="train", rotation_weight=0.0),
                     server=replace(base.server, meta_lr=1.0, optimizer="sgd"))
    configs = {"fedavg eps=8": replace(fedavg, privacy=replace(base.privacy, epsilon=8.0))}
    for eps in epsilons:
        if math.isinf(eps):
            configs["medmeta eps=inf"] = replace(base, privacy=replace(base.privacy,
                                                                       enabled=False))
        else:
            configs[f"medmeta eps={eps:g}"] = replace(base, privacy=replace(base.privacy,
                                                                            epsilon=eps))
    return configs


def with_overrides(config: FederationConfig, overrides: list[str]) -> FederationConfig:
    """``config`` with ``key.path=value`` settings applied and validated."""
    if not overrides:
        return config
    data = asdict(config)
    for item in overrides:
        key, _, value = item.partition("=")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return build(FederationConfig, json.loads(json.dumps(data)), source="--set")


def table(results: dict[str, dict], shots: list[int]) -> str:
    """Markdown table: methods x (scenario, K), mean ± 95% interval, in percent."""
    head = "| method | " + " | ".join(f"{s} K={k}" for s in SCENARIOS for k in shots) + " |"
    lines = [head, "|---" * (1 + len(SCENARIOS) * len(shots)) + "|"]
    for method, res in results.items():
        cells = [f"{100 * res[s][str(k)]['mean']:.1f} ± {100 * res[s][str(k)]['ci95']:.1f}"
                 for s in SCENARIOS for k in shots]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gains(results: dict[str, dict], shots: list[int]) -> str:
    """Gain over the untrained encoder, and medmeta(eps=8)'s share of the central gain."""
    base = results["untrained"]
    lines = ["| scenario | K | central gain | medmeta eps=8 gain | share | fedavg eps=8 gain |",
             "|---|---|---|---|---|---|"]
    for s in SCENARIOS:
        for k in shots:
            def gain(method: str, s: str = s, k: int = k) -> float:
                return 100 * (results[method][s][str(k)]["mean"] - base[s][str(k)]["mean"])
            if "central" not in results or "medmeta eps=8" not in results:
                continue
            share = gain("medmeta eps=8") / gain("central") if gain("central") > 0 else float("nan")
            fed = f"{gain('fedavg eps=8'):+.1f}" if "fedavg eps=8" in results else "-"
            lines.append(f"| {s} | {k} | {gain('central'):+.1f} | {gain('medmeta eps=8'):+.1f} | "
                         f"{share:.0%} | {fed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmark.yaml")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the pipeline")
    parser.add_argument("--methods", default="untrained,scratch,central,fedavg,medmeta")
    parser.add_argument("--epsilons", default="1,4,8,inf")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--scratch-episodes", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the figures as JSON after every method; methods already "
                        "in an existing file are kept and not run again (resume)")
    parser.add_argument("--merge", type=Path, action="append", default=[], metavar="JSON",
                        help="take the figures of another run (same split) as done; repeatable")
    parser.add_argument("--save-encoders", type=Path, default=None,
                        help="also save every trained encoder here (state dicts)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the medmeta method, e.g. "
                        "train.batch_size=256 (YAML value; repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    warnings.filterwarnings("ignore", category=UserWarning)
    for noisy in ("client", "client.app", "client.site", "medmeta_common"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    base = with_overrides(load_config(args.config), args.set)
    shots = [int(k) for k in args.shots.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    episodes, scratch_steps = args.episodes, 50
    if args.quick:
        base = replace(base, rounds=2, train=replace(base.train, local_steps=3))
        shots, epsilons, episodes, scratch_steps = [5], [8.0], 10, 5
        args.scratch_episodes = 5
    methods = args.methods.split(",")
    started = time.monotonic()
    print(f"# few-shot benchmark: split={args.split}, rounds={base.rounds}, "
          f"local_steps={base.train.local_steps}, episodes={episodes}, device={args.device}, "
          f"torch {torch.__version__}, {platform.machine()}, threads={torch.get_num_threads()}",
          flush=True)
    results = done_results(([args.out] if args.out else []) + args.merge, args.split)
    if results:
        log.info("already measured, not run again: %s", ", ".join(results))

    def record(name: str, figures: dict[str, dict]) -> None:
        results[name] = figures
        if args.out:  # after every method, atomically: a killed run keeps what it measured
            tmp_out = args.out.with_suffix(".json.tmp")
            tmp_out.write_text(json.dumps({"split": args.split, "shots": shots,
                                           "results": results}, indent=1))
            tmp_out.replace(args.out)

    with tempfile.TemporaryDirectory(prefix="medmeta-bench-") as tmp:
        folder = Path(tmp)
        data = scenario_data(args.data, args.split, folder)
        scenarios = {n: load_site(d, base.image) for n, d in data.items()}
        untrained = build_encoder(base.model, base.image, base.seed)
        if "untrained" in methods and "untrained" not in results:
            record("untrained", evaluate(untrained, base, scenarios, shots, episodes))
        if "scratch" in methods and "scratch" not in results:
            record("scratch", evaluate(untrained, base, scenarios, shots, episodes,
                                          finetune_steps=scratch_steps, finetune="all",
                                          max_episodes=args.scratch_episodes))
        if "central" in methods and "central" not in results:
            steps = base.rounds * base.train.local_steps * len(base.sites)
            encoder = run_centralized(replace(base, privacy=replace(base.privacy,
                                                                    enabled=False)),
                                      folder / "central", steps=steps, device=args.device)
            record("central", evaluate(encoder, base, scenarios, shots, episodes))
        for name, config in method_configs(base, epsilons).items():
            if name.split()[0] not in methods or name in results:
                continue
            t0 = time.monotonic()
            encoder, _ = run_inprocess(config, folder / name.replace(" ", "_"),
                                       device=args.device)
            if args.save_encoders:
                args.save_encoders.mkdir(parents=True, exist_ok=True)
                torch.save(encoder.state_dict(),
                           args.save_encoders / f"{name.replace(' ', '_')}.pt")
            record(name, evaluate(encoder, config, scenarios, shots, episodes))
            log.info("%s trained and evaluated in %.0f s", name, time.monotonic() - t0)
    print(table(results, shots))
    if "untrained" in results:
        print()
        print(gains(results, shots))
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
