"""Few-shot detection at a held-out site: scratch vs. prior vs. federated encoders.

Held-out detection site: BCCD blood-smear slides of one split of the dataset's own
``ImageSets/Main`` lists — ``val`` (87 slides) to make method choices, ``test`` (72
slides) for the final table. The multi-task federation's detection site trains on the
``train`` list only; no site of either federation uses BCCD in any other form (the
``bccd_cells_32.npz`` crops are not used), so no held-out slide is seen in training.
It is the same microscope and laboratory as the training detection site: a new
hospital with another scanner would be a harder shift than this one.

Each episode draws K annotated slides (all their tiles) as support and scores every
other slide of the split (mAP@0.5 and mAP@[.5:.95], MONAI's COCO metric); the same
seeded episodes for every encoder. Every row uses the same adaptation routine: a fresh
detection head trained on cached frozen features (300 Adam steps, flips), the same
tiles and resolution as the federation (image.size, the detection site's tile).

  (a) scratch          a randomly initialised encoder (model.weights: none)
  (b) prior            the public prior (EfficientNet-Lite0, ImageNet)
  (c) classification   the encoder of configs/multitask.yaml's classification sites only
  (d) multi-task       the encoder of the whole configs/multitask.yaml federation
                       (classification, segmentation and detection sites)

Paired differences (same episodes) are reported with 95% intervals.

    python benchmarks/detection.py --split test          # ~35 min on 2 CPU cores
    python benchmarks/detection.py --quick               # ~3 min
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from client.fewshot import mean_ci95
from client.tasks.detection_adapt import evaluate_fewshot_detection
from medmeta.benchmarking import federate
from medmeta_common.config import DataConfig, load_config
from medmeta_common.data.sources import load_detection
from medmeta_common.models.factory import build_encoder

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "data" / "bccd" / "BCCD"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "multitask.yaml")
    parser.add_argument("--held-out", type=Path, default=BCCD)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--steps", type=int, default=300, help="head steps per episode")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--encoders", type=Path, default=None,
                        help="a folder to keep the federated encoders in (reused when present)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    config = load_config(args.config)
    episodes, steps, shots = args.episodes, args.steps, args.shots
    if args.quick:
        config = replace(config, rounds=2, train=replace(config.train, local_steps=3))
        episodes, steps, shots = 3, 60, [1, 5]
    detection_sites = [s for s in config.sites if s.task == "detection"]
    if not detection_sites:
        parser.error(f"{args.config} has no detection site")
    tile = detection_sites[0].tile
    classification_only = replace(config, sites=tuple(s for s in config.sites
                                                      if s.task == "classification"),
                                  server=replace(config.server, min_sites=2))
    held_out = load_detection(DataConfig(path=str(args.held_out), split=args.split),
                              config.image, tile=tile)
    slides = len(np.unique(held_out.sources))
    print(f"# few-shot detection: held-out BCCD {args.split} ({slides} slides, "
          f"{len(held_out)} tiles of {tile} px at {config.image.size} px, "
          f"{len(held_out.boxes)} boxes, classes {', '.join(held_out.classes)}); federations "
          f"of {config.rounds} rounds x {config.train.local_steps} steps, epsilon "
          f"{config.privacy.epsilon:g}; {episodes} episodes, {steps} head steps; torch "
          f"{torch.__version__}, {platform.machine()}, 1 thread", flush=True)
    encoders = {
        "(a) scratch": build_encoder(replace(config.model, weights="none"), config.image,
                                     config.seed),
        "(b) prior": build_encoder(config.model, config.image, config.seed),
    }
    with tempfile.TemporaryDirectory(prefix="medmeta-det-") as tmp:
        for name, federation in (("(c) classification", classification_only),
                                 ("(d) multi-task", config)):
            kept = args.encoders / f"{name[1]}.pt" if args.encoders else None
            if kept is not None and kept.exists() and not args.quick:
                encoder = build_encoder(config.model, config.image, config.seed)
                encoder.load_state_dict(torch.load(kept))
                encoders[name] = encoder
                print(f"{name}: encoder read from {kept}", flush=True)
                continue
            started = time.monotonic()
            encoders[name] = federate(federation, Path(tmp) / name[1]).encoder
            print(f"{name} federation trained in {time.monotonic() - started:.0f} s",
                  flush=True)
            if kept is not None and not args.quick:
                kept.parent.mkdir(parents=True, exist_ok=True)
                torch.save(encoders[name].state_dict(), kept)
    results: dict[str, dict[int, object]] = {}
    print("| encoder | " + " | ".join(f"K={k} mAP@0.5" for k in shots) + " | "
          + " | ".join(f"K={k} mAP@[.5:.95]" for k in shots) + " |")
    print("|---|" + "---|" * (2 * len(shots)))
    for name, encoder in encoders.items():
        started = time.monotonic()
        results[name] = {k: evaluate_fewshot_detection(encoder, held_out, shots=k,
                                                       episodes=episodes, steps=steps, seed=0)
                         for k in shots}
        cells = [f"{results[name][k].map50_mean:.3f} ± {results[name][k].map50_ci95:.3f}"  # type: ignore[attr-defined]
                 for k in shots]
        cells += [f"{results[name][k].map_mean:.3f} ± {results[name][k].map_ci95:.3f}"  # type: ignore[attr-defined]
                  for k in shots]
        print(f"| {name} | {' | '.join(cells)} |  ({time.monotonic() - started:.0f} s)",
              flush=True)
    print("\npaired differences of mAP@0.5 (same episodes; mean ± 95% interval):")
    figures: dict[str, object] = {}
    for other in ("(a) scratch", "(b) prior", "(c) classification"):
        parts = []
        for k in shots:
            mine = np.array(results["(d) multi-task"][k].map50_per_episode)  # type: ignore[attr-defined]
            theirs = np.array(results[other][k].map50_per_episode)  # type: ignore[attr-defined]
            mean, ci = mean_ci95(mine - theirs)
            parts.append(f"K={k} {mean:+.3f} ± {ci:.3f}")
            figures[f"d_minus_{other[1]}_k{k}"] = [mean, ci]
        print(f"  (d) - {other}: " + ", ".join(parts))
    if args.json:
        figures["rows"] = {name: {str(k): {"map50": [r.map50_mean, r.map50_ci95],  # type: ignore[attr-defined]
                                           "map": [r.map_mean, r.map_ci95],  # type: ignore[attr-defined]
                                           "map50_per_episode": r.map50_per_episode}  # type: ignore[attr-defined]
                                  for k, r in per.items()}
                           for name, per in results.items()}
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
