"""Few-shot segmentation at a held-out site: scratch vs. classification pre-training vs. multi-task.

Held-out site: the MR tumour and lesion volumes (two brain, one breast; sliced, see
docs/data.md), never seen by any federation. For K = 1 and 5 annotated slices, each
episode adapts on the K support slices and scores Dice on 10 disjoint query slices
(20 seeded episodes, the same for every encoder; mean and 95% interval):

  (a) scratch         a random encoder + decoder, both trained on the support tiles
                      (with model.weights: imagenet, "(a) prior": the public prior)
  (b) classification  the encoder of a federation of the classification sites only of
                      configs/multitask.yaml (same rounds, steps and epsilon)
  (c) multi-task      the encoder of the whole multi-task federation (classification
                      and segmentation sites, configs/multitask.yaml)

(b) and (c) are adapted two ways: the decoder only, and decoder + encoder (as (a)).

    python benchmarks/segmentation.py            # ~15 min on 2 CPU cores
    python benchmarks/segmentation.py --quick    # ~2 min
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

from client.tasks.segmentation_adapt import evaluate_fewshot_segmentation
from medmeta.benchmarking import federate
from medmeta_common.config import DataConfig, load_config
from medmeta_common.data.sources import load_segmentation
from medmeta_common.models.factory import build_encoder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "multitask.yaml")
    parser.add_argument("--held-out", type=Path, default=ROOT.parent / "shared" / "data"
                        / "segmentation" / "brain_breast_mr")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=100, help="adaptation steps per episode")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=None,
                        help="override the federation's image size (segmentation needs pixels)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    config = load_config(args.config)
    if args.image_size:
        config = replace(config, image=replace(config.image, size=args.image_size))
    episodes, steps = args.episodes, args.steps
    if args.quick:
        config = replace(config, rounds=2, train=replace(config.train, local_steps=3))
        episodes, steps = 3, 20
    classification_only = replace(config, sites=tuple(s for s in config.sites
                                                      if s.task == "classification"),
                                  server=replace(config.server, min_sites=2))
    held_out = load_segmentation(DataConfig(path=str(args.held_out), split=None), config.image)
    print(f"# few-shot segmentation: held-out {args.held_out.name} ({len(held_out)} slices), "
          f"federations of {config.rounds} rounds x {config.train.local_steps} steps, "
          f"epsilon {config.privacy.epsilon:g}; {episodes} episodes, {steps} adaptation steps; "
          f"torch {torch.__version__}, {platform.machine()}, 1 thread", flush=True)
    # (a) is the federation's starting encoder: the public prior, or random weights.
    start = "(a) scratch" if config.model.weights == "none" else "(a) prior"
    encoders = {start: build_encoder(config.model, config.image, config.seed)}
    with tempfile.TemporaryDirectory(prefix="medmeta-seg-") as tmp:
        for name, federation in (("(b) classification", classification_only),
                                 ("(c) multi-task", config)):
            started = time.monotonic()
            encoders[name] = federate(federation, Path(tmp) / name[:3]).encoder
            print(f"{name} federation trained in {time.monotonic() - started:.0f} s",
                  flush=True)
    print("| encoder | adapted | K=1 Dice | K=5 Dice | K=1 Dice, foreground slices | "
          "K=5 Dice, foreground slices |")
    print("|---|---|---|---|---|---|")
    rows = [(start, "all")] + [(n, mode) for n in ("(b) classification",
                                                           "(c) multi-task")
                                       for mode in ("decoder", "all")]
    rows.append((start, "decoder"))
    for name, mode in rows:
        cells, foreground = [], []
        for shots in (1, 5):
            r = evaluate_fewshot_segmentation(encoders[name], held_out, shots=shots,
                                              queries=10, episodes=episodes, steps=steps,
                                              finetune=mode, seed=0)
            cells.append(f"{r.dice_mean:.3f} ± {r.dice_ci95:.3f}")
            foreground.append(f"{r.foreground_dice_mean:.3f} ± {r.foreground_dice_ci95:.3f}")
        cells += foreground
        label = name
        if name == start and mode == "decoder":
            label = "untrained encoder" if start == "(a) scratch" else "(a) prior, frozen"
        print(f"| {label} | {mode} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
