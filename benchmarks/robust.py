"""Hostile and broken updates: held-out few-shot accuracy per aggregator and attack.

A five-site federation on the built-in SYNTHETIC demo (``builtin:demo/site-0`` and
``site-1`` each split into two patient-disjoint halves, plus ``site-2``) trains in
process (:func:`medmeta.benchmarking.federate`: the real Strategy with its update checks
and aggregators, the real ClientApp, an in-process Grid). DP is off: the attacks act on the
updates whatever produced them, and without DP noise a few short rounds already
move the encoder far enough for a damaged one to show. One or two sites
(``b1``, then ``a1``) are hostile from the first round (:mod:`medmeta.attacks`, a
ClientApp mod at the site):

- ``sign_flip``: send ``theta - 4 (theta_i - theta)``;
- ``scale``: send ``theta + 100 (theta_i - theta)``;
- ``nan``: send NaN everywhere (rejected by the server's checks).

Aggregators: ``mean``, ``trimmed_mean`` (0.2: one of five cut at each end),
``median``, ``multikrum`` (f = 1), and the plain mean with ``server.max_update_norm``
set to twice the largest honest update norm of the clean run.

The final encoder is adapted with class prototypes at the held-out demo site
(``builtin:demo/site-3``, pattern classes no training site has): 4-way 5-shot,
15 queries per class, the same seeded episodes for every run. Each row is the mean
accuracy with its 95% interval, and its difference from the clean run with the
plain mean (measured in the same process) with a paired 95% interval over the same
episodes.

    python benchmarks/robust.py --quick     # the pipeline: 5 short federations, ~20 s CPU
    python benchmarks/robust.py             # the table in RESULTS.md: 34 federations,
                                            # ~11 CPU-minutes on one thread
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.fewshot import FewShotResult
from medmeta.attacks import ATTACKS
from medmeta.benchmarking import (
    HELD_OUT,
    HELD_OUT_FEWSHOT,
    attacked,
    held_out_accuracy,
    held_out_data,
    robust_federation,
)
from medmeta_common.config import FederationConfig
from medmeta_common.data.records import SiteData
from medmeta_common.models.factory import build_encoder

log = logging.getLogger("benchmark")

# Aggregator variants: server settings over the plain mean. The norm bound of the
# last one is set from the clean run (see ``norm_bound``).
VARIANTS: dict[str, dict[str, Any]] = {
    "mean": {},
    "trimmed_mean (0.2)": {"aggregator": "trimmed_mean", "trim_fraction": 0.2},
    "median": {"aggregator": "median"},
    "multikrum (f=1)": {"aggregator": "multikrum", "max_faulty": 1},
    "mean + norm bound": {"max_update_norm": "from the clean run"},
}


@dataclass(frozen=True)
class Case:
    """One federation run under one attack, and its held-out result."""

    result: FewShotResult
    history: list[dict]
    cpu_seconds: float


def run_case(config: FederationConfig, data: SiteData, attack: str | None, count: int,
             workdir: Path) -> Case:
    """Train ``config`` with ``count`` sites sending ``attack`` (``None``: all honest)."""
    started = time.process_time()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run = attacked(config, Path(tmp) / "run", attack, count)
    return Case(held_out_accuracy(run.encoder, data), run.rounds,
                time.process_time() - started)


def paired_difference(a: FewShotResult, b: FewShotResult) -> tuple[float, float]:
    """Mean of ``a - b`` over the same episodes, and its 95% interval half-width."""
    diff = np.asarray(a.accuracies) - np.asarray(b.accuracies)
    if diff.size < 2:
        return float(diff.mean()), 0.0
    return float(diff.mean()), float(1.96 * diff.std(ddof=1) / math.sqrt(diff.size))


def norm_bound(clean: Case, factor: float = 2.0) -> float:
    """``factor`` times the largest honest update norm of the clean run."""
    norms = [s["update_norm"] for r in clean.history for s in r["sites"].values()
             if "update_norm" in s]
    return factor * max(norms)


def row(variant: str, attack: str, count: int, case: Case, clean: Case) -> str:
    """One Markdown table row, in percent."""
    diff, ci = paired_difference(case.result, clean.result)
    return (f"| {variant} | {attack} | {count} | {100 * case.result.accuracy_mean:.1f} ± "
            f"{100 * case.result.accuracy_ci95:.1f} | {100 * diff:+.1f} ± {100 * ci:.1f} | "
            f"{rejections(case.history)} |")


def rejections(history: list[dict]) -> str:
    """Sites the server's checks rejected, with in how many rounds: ``b1 (3/4)``."""
    counts: dict[str, int] = {}
    for record in history:
        for name, site in record["sites"].items():
            if site["status"] == "rejected":
                counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} ({k}/{len(history)})" for n, k in sorted(counts.items())) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny run of the pipeline")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--dp", action="store_true", help="train under DP-SGD (epsilon 8)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--hostile", default="1,2", help="numbers of hostile sites")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    warnings.filterwarnings("ignore", category=UserWarning)
    for noisy in ("client", "medmeta", "server", "medmeta_common", "benchmark"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(1)

    variants, attacks = args.variants.split(","), args.attacks.split(",")
    counts = [int(c) for c in args.hostile.split(",")]
    rounds, steps = args.rounds, args.local_steps
    if args.quick:
        rounds, steps, variants, attacks, counts = 2, 5, ["mean", "median"], \
            ["sign_flip", "nan"], [1]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    base = robust_federation(rounds=rounds, local_steps=steps, dp=args.dp)
    data = held_out_data(base)
    print(f"# hostile updates: 5 sites, rounds={rounds}, local_steps={steps}, "
          f"dp={'on (epsilon 8)' if args.dp else 'off'}, held-out {HELD_OUT} "
          f"{HELD_OUT_FEWSHOT.ways}-way {HELD_OUT_FEWSHOT.shots}-shot, "
          f"{HELD_OUT_FEWSHOT.episodes} episodes; torch {torch.__version__}, "
          f"{platform.machine()}, threads={torch.get_num_threads()}", flush=True)
    untrained = held_out_accuracy(build_encoder(base.model, base.image, base.seed), data)
    print(f"# untrained encoder, same episodes: {100 * untrained.accuracy_mean:.1f} ± "
          f"{100 * untrained.accuracy_ci95:.1f}%", flush=True)
    lines = ["| aggregator | attack | hostile sites | held-out accuracy % | "
             "vs clean mean (paired) | rejected (rounds) |", "|---|---|---|---|---|---|"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="medmeta-robust-") as tmp:
        workdir = Path(tmp)
        clean = run_case(base, data, None, 0, workdir)
        log.info("clean mean: %.1f%% (%.0f s CPU)", 100 * clean.result.accuracy_mean,
                 clean.cpu_seconds)
        for variant in variants:
            server = dict(VARIANTS[variant])
            if "max_update_norm" in server:
                server["max_update_norm"] = round(norm_bound(clean), 3)
                variant = f"mean + norm bound {server['max_update_norm']:g}"
            config = replace(base, server=replace(base.server, **server))
            cases = [(None, 0)] + [(a, c) for a in attacks for c in counts]
            for attack, count in cases:
                case = clean if (attack is None and not server) else \
                    run_case(config, data, attack, count, workdir)
                lines.append(row(variant, attack or "none", count, case, clean))
                log.info("%s", lines[-1])
    print("\n".join(lines))
    print(f"\n(total {time.monotonic() - started:.0f} s wall)")


if __name__ == "__main__":
    main()
