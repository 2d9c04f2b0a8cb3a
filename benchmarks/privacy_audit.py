"""Empirical ε lower bounds of medmeta's DP-SGD, beside a non-private control and a broken run.

One-run canary audit (Steinke, Nasr & Jagielski 2023; ``medmeta privacy audit``) on real
cell images (BCCD): a non-private control (the leakage the audit can see), the shipped
mechanism at several claimed ε, and the same mechanism with the noise switched off
(a deliberately broken setting that the audit must catch).

    python benchmarks/privacy_audit.py            # full: ~15 min on 2 CPU cores
    python benchmarks/privacy_audit.py --quick    # ~3 min
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from client.audit import classification_mechanism
from medmeta_common.config import DataConfig, load_config
from medmeta_common.data.sources import load_site
from medmeta_common.privacy.canary_audit import run_audit

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=ROOT.parent / "shared" / "data" / "bccd" / "bccd_cells_32.npz")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmark.yaml",
                        help="the federation whose mechanism is audited (image, model, "
                        "trainable set)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epsilons", default="1,4,8")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    records, steps, canaries, guesses = (500, 600, 200, 40) if args.quick else \
        (1000, 600, 500, 100)
    config = load_config(args.config)
    site = load_site(DataConfig(path=str(args.data), split=None), config.image)
    site = site.subset(np.random.default_rng(0).permutation(len(site.labels))[:records])
    train = replace(config.train, local_steps=steps, batch_size=64, lr=0.1, augment=False)
    mechanism = classification_mechanism(config.image, config.model, train, steps=steps,
                                         max_grad_norm=1.0)
    print(f"# privacy audit of {args.config.name}'s mechanism ({config.model.backbone}, "
          f"weights {config.model.weights}, trainable {train.trainable}, "
          f"{config.image.size} px): {args.data.name}, {records} images + {canaries} canaries, "
          f"{steps} steps, expected batch 64, {2 * guesses} guesses, 95% confidence; "
          f"torch {torch.__version__}, {platform.machine()}, 1 thread", flush=True)
    print("| run | claimed ε | σ trained | right guesses | ε lower bound | verdict | s |")
    print("|---|---|---|---|---|---|---|")
    runs: list[tuple[str, float | None, float | None]] = [("non-private control", None, None)]
    runs += [(f"DP-SGD ε={float(e):g}", float(e), None) for e in args.epsilons.split(",")]
    runs.append(("noise off (broken), claims ε=1", 1.0, 0.0))
    for name, claim, used in runs:
        started = time.monotonic()
        report = run_audit(site, mechanism, claimed_epsilon=claim, canaries=canaries,
                           guesses_per_side=guesses, noise_multiplier_used=used)
        r = report.result
        verdict = "leaks (audit has power)" if claim is None else \
            ("pass" if report.passed else "FAIL: bound above claim")
        sigma = report.noise_multiplier_trained
        print(f"| {name} | {claim if claim is not None else '—'} | {sigma:.3f} | "
              f"{r.correct}/{r.guesses} | {r.epsilon_lower_bound:.2f} | {verdict} | "
              f"{time.monotonic() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
