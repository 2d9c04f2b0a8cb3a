"""Few-shot accuracy at sites the federation never saw: medmeta against its baselines.

Every row adapts the same way at the new site (class prototypes from K support images
per class, queries by cosine similarity, the same seeded episodes; "+ft" rows then
fine-tune with ``medmeta adapt``'s default routine), and uses the same feature-stage
rule (``model.pool`` of the benchmark config):

  (a) prior            the public prior alone, frozen: what a new site gets without joining
  (b) prior+ft         the prior fine-tuned on the new site's support set alone
  (c) fedavg eps=8     FedAvg of the same trainable set at the same epsilon (plain local
                       SGD, every class each step, server averaging)
  (d) central          non-private fine-tuning on the pooled training sites (upper bound;
                       its grid is reported, chosen on validation)
  (d') central-dp eps=8  the same pooled training under record-level DP-SGD at epsilon 8
  (e) medmeta eps=E    the shipped method (configs/benchmark.yaml) at E = 1, 4, 8, inf,
                       with and without new-site fine-tuning ("+ft")
      old eps=8        the previous release's method (a small CNN trained from scratch)
      synthetic, random  EfficientNet-Lite0 from the data-free synthetic prior / random
                       initialisation, frozen (with --synthetic-prior FILE)

Held-out scenarios (no site trains on them):

  brain-shift  brain MRI patients no site has, through a simulated scanner change
               (gamma 0.6, blur 0.8 px, noise 4% of range); 4-way. The test split's exact
               copies of training slices are left out of the sites' data.
  blood-new    blood-cell classes no site has (erythroblast, lymphocyte, platelet); 3-way
  breast       breast ultrasound, a modality no site has; 2-way

Choices are made on ``--split val`` (brain: a pseudo-patient part of the training slices
that no site holds; the PBC and BreastMNIST validation splits); the table uses
``--split test``.

    python benchmarks/fewshot.py --quick
    python benchmarks/fewshot.py --split test --out benchmarks/fewshot_test.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medmeta.benchmarking import (
    SCENARIOS,
    benchmark_sites,
    evaluate,
    federate,
    pooled_rate,
    scenario_data,
    train_centralized,
)
from medmeta_common.config import FederationConfig, load_config
from medmeta_common.config.typed import build
from medmeta_common.data.sources import load_site
from medmeta_common.models.factory import build_encoder
from medmeta_common.privacy.accounting import calibrate_noise, default_delta
from medmeta_common.privacy.dp_sgd import DPSettings

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")

# The previous release's shipped method, for reference (its configs/benchmark.yaml).
OLD_METHOD = {"image": {"size": 32, "channels": 1, "intensity": "zscore"},
              "model": {"backbone": "small", "weights": "none", "pool": [8],
                        "weight_standardization": True},
              "train": {"trainable": "all", "local_steps": 20, "batch_size": 64, "lr": 0.03,
                        "momentum": 0.9, "augment": True, "augment_multiplicity": 1,
                        "ways": None},
              "server": {"meta_lr": 1.0, "optimizer": "sgd"}, "rounds": 30}


def with_overrides(config: FederationConfig, overrides: dict[str, Any]) -> FederationConfig:
    """``config`` with nested settings replaced (validated like a YAML file)."""
    data = json.loads(json.dumps(asdict(config), default=list))

    def merge(node: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                merge(node[key], value)
            else:
                node[key] = value

    merge(data, overrides)
    return build(FederationConfig, data, source="benchmark override")


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set train.lr=0.1`` items as a nested override."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def method_configs(base: FederationConfig, epsilons: list[float]) -> dict[str, FederationConfig]:
    """The federated rows: FedAvg, medmeta at each epsilon, and the old method."""
    fedavg = with_overrides(base, {"train": {"ways": None, "augment_multiplicity": 1,
                                             "head": "train"},
                                   "server": {"meta_lr": 1.0, "optimizer": "sgd"},
                                   "privacy": {"epsilon": 8.0}})
    configs = {"fedavg eps=8": fedavg}
    for eps in epsilons:
        privacy = {"enabled": False} if math.isinf(eps) else {"epsilon": eps}
        configs[f"medmeta eps={eps:g}"] = with_overrides(base, {"privacy": privacy})
    configs["old eps=8"] = with_overrides(base, {**OLD_METHOD, "privacy": {"epsilon": 8.0}})
    return configs


def done_results(files: list[Path], split: str) -> dict[str, dict[str, Any]]:
    """Figures already measured in earlier runs of the same split (resume and merge)."""
    results: dict[str, dict[str, Any]] = {}
    for file in files:
        if not file.exists():
            continue
        earlier = json.loads(file.read_text())
        if earlier.get("split") != split:
            raise SystemExit(f"{file}: figures of split {earlier.get('split')!r}, "
                             f"not {split!r}; refusing to mix them")
        results.update(earlier["results"])
    return results


def paired(results: dict[str, Any], a: str, b: str, scenario: str, k: int) -> str:
    """``a − b`` in points over their common episodes, with the paired 95% interval."""
    x = np.asarray(results[a][scenario][str(k)]["accuracies"])
    y = np.asarray(results[b][scenario][str(k)]["accuracies"])
    n = min(len(x), len(y))
    diff = 100 * (x[:n] - y[:n])
    ci = 1.96 * diff.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
    return f"{diff.mean():+.1f} ± {ci:.1f}"


def table(results: dict[str, Any], shots: list[int]) -> str:
    """Markdown table: methods x (scenario, K), mean ± 95% interval, in percent."""
    head = "| method | " + " | ".join(f"{s} K={k}" for s in SCENARIOS for k in shots) + " |"
    lines = [head, "|---" * (1 + len(SCENARIOS) * len(shots)) + "|"]
    for method, res in results.items():
        cells = [f"{100 * res[s][str(k)]['mean']:.1f} ± {100 * res[s][str(k)]['ci95']:.1f}"
                 if s in res and str(k) in res[s] else "-" for s in SCENARIOS for k in shots]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons(results: dict[str, Any], shots: list[int], method: str) -> str:
    """``method`` against (a), (b), (c) paired, and its share of the central gain."""
    lines = [f"| scenario | K | {method} − prior | − prior+ft | − fedavg | share of central "
             "gain |", "|---|---|---|---|---|---|"]
    for s in SCENARIOS:
        for k in shots:
            cells = [paired(results, method, other, s, k) if other in results else "-"
                     for other in ("prior", "prior+ft", "fedavg eps=8")]
            share = "-"
            if "central" in results and "prior" in results:
                gain = results["central"][s][str(k)]["mean"] - results["prior"][s][str(k)]["mean"]
                mine = results[method][s][str(k)]["mean"] - results["prior"][s][str(k)]["mean"]
                share = f"{mine / gain:.0%}" if gain > 0 else "n/a (no central gain)"
            lines.append(f"| {s} | {k} | " + " | ".join(cells) + f" | {share} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmark.yaml")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the pipeline")
    parser.add_argument("--methods", default="prior,prior+ft,fedavg,central,central-dp,"
                        "medmeta,medmeta+ft,old")
    parser.add_argument("--epsilons", default="1,4,8,inf")
    parser.add_argument("--shots", default="1,5,10")
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--ft-episodes", type=int, default=60,
                        help="episodes of the fine-tuned rows (each fine-tunes the encoder)")
    parser.add_argument("--ft-mode", default="film", choices=("head", "film", "all"),
                        help="what the +ft rows fine-tune (as `medmeta adapt --finetune`)")
    parser.add_argument("--ft-steps", type=int, default=20,
                        help="fine-tuning steps of the +ft rows")
    parser.add_argument("--ft-lr", type=float, default=None,
                        help="fine-tuning learning rate (default: the mode's, as `adapt`)")
    parser.add_argument("--central-steps", default="300",
                        help="steps of the central upper bound (comma list: a grid)")
    parser.add_argument("--central-lrs", default="0.01",
                        help="learning rates of the central upper bound (comma list: a grid)")
    parser.add_argument("--synthetic-prior", type=Path, default=None,
                        help="also evaluate this data-free prior (medmeta pretrain --synthetic)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the figures as JSON after every method; methods already "
                        "in an existing file are kept and not run again (resume)")
    parser.add_argument("--merge", type=Path, action="append", default=[], metavar="JSON",
                        help="take the figures of another run (same split) as done; repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the medmeta method (YAML value)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    warnings.filterwarnings("ignore", category=UserWarning)
    for noisy in ("client", "medmeta", "server", "medmeta_common", "flwr"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = with_overrides(load_config(args.config), parse_set(args.set))
    shots = [int(k) for k in args.shots.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    episodes, ft_episodes = args.episodes, args.ft_episodes
    grid = [(int(s), float(lr)) for s in args.central_steps.split(",")
            for lr in args.central_lrs.split(",")]
    if args.quick:
        base = replace(base, rounds=2, train=replace(base.train, local_steps=2))
        shots, epsilons, episodes, ft_episodes, grid = [5], [8.0], 10, 3, [(4, grid[0][1])]
        args.ft_steps = 2
    methods = args.methods.split(",")
    known = {"prior", "prior+ft", "fedavg", "fedavg+ft", "central", "central-dp", "medmeta",
             "medmeta+ft", "old"}
    if set(methods) - known:
        parser.error(f"unknown --methods {sorted(set(methods) - known)}; known: {sorted(known)}")
    started = time.monotonic()
    print(f"# few-shot benchmark: split={args.split}, {base.model.backbone} "
          f"({base.model.weights}, trainable {base.train.trainable}, pool "
          f"{list(base.model.pool)}), {base.image.size} px, rounds={base.rounds}, "
          f"local_steps={base.train.local_steps}, batch {base.train.batch_size}, episodes "
          f"{episodes} (+ft {ft_episodes}); torch {torch.__version__}, {platform.machine()}, "
          f"threads={torch.get_num_threads()}", flush=True)
    results = done_results(([args.out] if args.out else []) + args.merge, args.split)
    if results:
        log.info("already measured, not run again: %s", ", ".join(results))

    def record(name: str, figures: dict[str, Any]) -> None:
        results[name] = figures
        if args.out:  # after every method, atomically: a killed run keeps what it measured
            tmp_out = args.out.with_suffix(".json.tmp")
            tmp_out.write_text(json.dumps({"split": args.split, "shots": shots,
                                           "results": results}, indent=1))
            tmp_out.replace(args.out)

    with tempfile.TemporaryDirectory(prefix="medmeta-bench-") as tmp:
        folder = Path(tmp)
        base = benchmark_sites(base, args.data, folder)
        data = scenario_data(args.data, args.split, folder)
        loaded: dict[tuple[Any, ...], dict[str, Any]] = {}

        def scenarios(config: FederationConfig) -> dict[str, Any]:
            key = tuple(asdict(config.image).values())
            if key not in loaded:
                loaded[key] = {n: load_site(d, config.image) for n, d in data.items()}
            return loaded[key]


        def measure(name: str, encoder: torch.nn.Module, config: FederationConfig,
                    finetune: bool = False) -> None:
            t0 = time.monotonic()
            if finetune:
                figures = evaluate(encoder, config, scenarios(config), shots, ft_episodes,
                                   finetune_steps=args.ft_steps, finetune=args.ft_mode,
                                   finetune_lr=args.ft_lr)
            else:
                figures = evaluate(encoder, config, scenarios(config), shots, episodes)
            record(name, figures)
            log.info("%s evaluated in %.0f s", name, time.monotonic() - t0)

        def wanted(name: str, key: str) -> bool:
            return key in methods and name not in results

        prior = build_encoder(base.model, base.image, base.seed)
        if wanted("prior", "prior"):
            measure("prior", prior, base)
        if wanted("prior+ft", "prior+ft"):
            measure("prior+ft", prior, base, finetune=True)
        if args.synthetic_prior is not None and "synthetic" not in results:
            synthetic = replace(base, model=replace(base.model, weights=str(args.synthetic_prior)))
            measure("synthetic", build_encoder(synthetic.model, synthetic.image, base.seed),
                    synthetic)
            random_init = replace(base, model=replace(base.model, weights="none"))
            measure("random", build_encoder(random_init.model, random_init.image, base.seed),
                    random_init)
        central = replace(base, privacy=replace(base.privacy, enabled=False),
                          train=replace(base.train, trainable="all"))
        for steps, lr in grid:
            name = f"central steps={steps} lr={lr:g}"
            if wanted(name, "central"):
                config = replace(central, train=replace(central.train, lr=lr))
                encoder = train_centralized(config, folder / "central", steps=steps)
                measure(name, encoder, base)
        if "central" in methods and "central" not in results:
            best = best_central(results, grid)  # chosen on this split's mean: see RESULTS
            if best:
                record("central", {**results[best], "grid_choice": best})
        if wanted("central-dp eps=8", "central-dp"):
            rate, n = pooled_rate(base, folder / "central")
            steps = max(1, base.rounds * base.train.local_steps)
            sigma = calibrate_noise(epsilon=8.0, delta=default_delta(n), sample_rate=rate,
                                    steps=steps, accountant=base.privacy.accountant)
            encoder = train_centralized(base, folder / "central", steps=steps,
                                        dp=DPSettings(sigma, rate, base.privacy.max_grad_norm))
            measure("central-dp eps=8", encoder, base)
        for name, config in method_configs(base, epsilons).items():
            kind = name.split()[0]
            if not wanted(name, kind) and not wanted(f"{name} +ft", f"{kind}+ft"):
                continue
            t0 = time.monotonic()
            run = federate(config, folder / name.replace(" ", "_").replace("=", ""))
            log.info("%s federation trained in %.0f s", name, time.monotonic() - t0)
            if wanted(name, kind):
                measure(name, run.encoder, config)
            if wanted(f"{name} +ft", f"{kind}+ft") and config.model.backbone != "small":
                measure(f"{name} +ft", run.encoder, config, finetune=True)
    shown = {k: v for k, v in results.items() if not k.startswith("central steps")}
    print(table(shown, shots))
    for method in ("medmeta eps=8", "medmeta eps=8 +ft"):
        if method in results:
            print()
            print(comparisons(results, shots, method))
    grid_rows = {k: v for k, v in results.items() if k.startswith("central steps")}
    if grid_rows:
        print("\ncentral grid:\n" + table(grid_rows, shots))
    print(f"\n(total {time.monotonic() - started:.0f} s)")


def best_central(results: dict[str, Any], grid: list[tuple[int, float]]) -> str | None:
    """The grid point with the best mean accuracy over scenarios and K."""
    names = [f"central steps={s} lr={lr:g}" for s, lr in grid]
    scored: list[tuple[float, str]] = []
    for name in names:
        if name in results:
            means = [v["mean"] for s in SCENARIOS for v in results[name][s].values()]
            scored.append((float(np.mean(means)), name))
    return max(scored)[1] if scored else None


if __name__ == "__main__":
    main()
