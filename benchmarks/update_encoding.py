"""Bytes a site sends per round, and few-shot accuracy, for float32 / float16 / int8 updates.

The few-shot benchmark's federation (configs/benchmark.yaml) is trained in process
(:func:`benchmarks.federation.run_inprocess`: the real site rounds, update checks and
meta-update, with each update encoded and decoded as it would travel) once per
encoding, and each final encoder is evaluated on the held-out scenarios of
``benchmarks/fewshot.py`` with the same seeded episodes. The float32 run is the
baseline, in the same process.

Without DP (the default here) training is seeded, so the only difference between the
runs is the encoding. With ``--private`` every run draws fresh DP noise and sampling,
and a second float32 run shows how far two runs differ anyway.

    python benchmarks/update_encoding.py              # ~10 min on 2 CPU cores
    python benchmarks/update_encoding.py --quick      # ~1 min: 2 rounds of 2 steps, 10 episodes
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from medmeta.benchmarking import evaluate, federate, scenario_data
from medmeta_common.config import load_config
from medmeta_common.data.sources import load_site

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmark.yaml")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--private", action="store_true", help="train under DP (epsilon 8)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    rounds, episodes = (2, 10) if args.quick else (args.rounds, args.episodes)
    base = load_config(args.config)
    base = replace(base, rounds=rounds, privacy=replace(base.privacy, enabled=args.private))
    if args.quick:  # the bytes do not depend on the steps; the accuracy is only smoke here
        base = replace(base, train=replace(base.train, local_steps=2))
    runs = ["float32", "float16", "int8"] + (["float32"] if args.private else [])
    dp = "on (epsilon 8)" if args.private else "off (seeded: runs differ only in the encoding)"
    print(f"# update encodings: {args.config.name}, {len(base.sites)} sites x {rounds} rounds, "
          f"DP {dp}; {args.shots}-shot, {episodes} episodes per scenario; torch "
          f"{torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image = base.image
        scenarios = {name: load_site(data, image)
                     for name, data in scenario_data(args.data, "test", folder).items()}
        names = list(scenarios)
        print("| encoding | bytes sent per site per round | vs float32 | "
              + " | ".join(f"{n} acc." for n in names) + " | mean Δ vs float32 (points) | s |")
        print("|---|---|---|" + "---|" * len(names) + "---|---|")
        reference: dict[str, float] | None = None
        full_bytes = None
        for index, encoding in enumerate(runs):
            started = time.monotonic()
            config = replace(base, server=replace(base.server, update_encoding=encoding))
            run = federate(config, folder / f"run-{index}")
            encoder, history = run.encoder, run.rounds
            sent = [s["update_bytes"] for r in history for s in r["sites"].values()
                    if "update_bytes" in s]
            per_site = sum(sent) / len(sent)
            full_bytes = full_bytes or per_site
            scores = evaluate(encoder, config, scenarios, [args.shots], episodes)
            accuracy = {n: 100 * scores[n][str(args.shots)]["mean"] for n in names}
            ci = {n: 100 * scores[n][str(args.shots)]["ci95"] for n in names}
            reference = reference or accuracy
            delta = sum(accuracy[n] - reference[n] for n in names) / len(names)
            label = encoding + (" (baseline)" if index == 0 else
                                " (second run)" if index == 3 else "")
            cells = " | ".join(f"{accuracy[n]:.1f} ± {ci[n]:.1f}" for n in names)
            print(f"| {label} | {per_site / 1024:.1f} KiB | {per_site / full_bytes:.2f}x | "
                  f"{cells} | {delta:+.2f} | {time.monotonic() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
