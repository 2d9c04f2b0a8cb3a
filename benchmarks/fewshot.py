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
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml

from medmeta.benchmarking import (
    SCENARIOS,
    evaluate,
    federate,
    scenario_data,
    train_centralized,
)
from medmeta_common.config import FederationConfig, load_config
from medmeta_common.config.typed import build
from medmeta_common.data.sources import load_site
from medmeta_common.models.factory import build_encoder

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmark")


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
    for noisy in ("client", "medmeta", "server", "medmeta_common"):
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
            encoder = train_centralized(replace(base, privacy=replace(base.privacy,
                                                                      enabled=False)),
                                        folder / "central", steps=steps, device=args.device)
            record("central", evaluate(encoder, base, scenarios, shots, episodes))
        for name, config in method_configs(base, epsilons).items():
            if name.split()[0] not in methods or name in results:
                continue
            t0 = time.monotonic()
            encoder = federate(config, folder / name.replace(" ", "_"),
                               device=args.device).encoder
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
