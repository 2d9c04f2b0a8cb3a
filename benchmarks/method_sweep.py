"""Compare variants of the medmeta method on validation data, several at a time.

Each variant is a set of ``--set`` overrides of ``configs/benchmark.yaml`` run through
``benchmarks/fewshot.py --split val --methods medmeta`` in its own process; the
untrained encoder and the central upper bound run once beside them. The table ranks
variants by their mean gain over the untrained encoder across the three held-out
scenarios. Validation data only: the test splits are never used for a choice.

    python benchmarks/method_sweep.py --parallel 2                    # CPU box (slow)
    python benchmarks/method_sweep.py --parallel 8 --device cuda      # GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, list[str]] = {
    "base (fedavg recipe)": [],
    "batch 256": ["train.batch_size=256"],
    "batch 256, 10 steps": ["train.batch_size=256", "train.local_steps=10"],
    "5 local steps": ["train.local_steps=5"],
    "lr 0.3": ["train.lr=0.3"],
    "server momentum": ["server.optimizer=momentum", "server.meta_lr=0.5"],
    "server adam": ["server.optimizer=adam", "server.meta_lr=0.01"],
    "frozen head": ["train.head=frozen"],
    "augment x4": ["train.augment_multiplicity=4"],
    "no augmentation": ["train.augment=false"],
    "weight standardisation": ["model.weight_standardization=true"],
    "rgb input": ["image.channels=3"],
    "ws + aug x4 + batch 256": ["model.weight_standardization=true",
                                "train.augment_multiplicity=4", "train.batch_size=256"],
    "non-private (eps=inf)": ["privacy.enabled=false"],
}


def run(name: str, overrides: list[str], args: argparse.Namespace, out: Path) -> dict:
    target = out / (name.replace(" ", "_").replace("(", "").replace(")", "")
                    .replace(",", "").replace("=", "") + ".json")
    methods = "untrained,central" if name == "baselines" else "medmeta"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fewshot.py"), "--split", "val",
           "--methods", methods, "--epsilons", "8", "--shots", args.shots, "--episodes",
           str(args.episodes), "--device", args.device, "--data", str(args.data),
           "--out", str(target)]
    for item in overrides:
        cmd += ["--set", item]
    if "privacy.enabled=false" in overrides:
        cmd[cmd.index("--epsilons") + 1] = "inf"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        return {"name": name, "error": result.stderr[-2000:]}
    data = json.loads(target.read_text())
    return {"name": name, "seconds": time.monotonic() - started, **data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--shots", default="5")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sweep")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = {"baselines": [], **VARIANTS}
    if args.only:
        keep = set(args.only.split(","))
        variants = {k: v for k, v in variants.items() if k in keep or k == "baselines"}
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda item: run(*item, args, args.out), variants.items()))
    (args.out / "sweep.json").write_text(json.dumps(runs, indent=1))
    base = next(r for r in runs if r["name"] == "baselines")
    untrained = base["results"]["untrained"]
    rows = []
    for r in runs:
        if "error" in r:
            print(f"{r['name']}: FAILED\n{r['error']}")
            continue
        for method, res in r["results"].items():
            label = r["name"] if r["name"] != "baselines" else method
            cells = {f"{s} K={k}": 100 * res[s][k]["mean"] for s in res for k in res[s]}
            gain = sum(v - 100 * untrained[s][k]["mean"] for (s, k), v in
                       zip(((s, k) for s in res for k in res[s]), cells.values(), strict=True))
            rows.append((gain / len(cells), label, cells, r.get("seconds", 0)))
    rows.sort(key=lambda row: -row[0])
    columns = list(rows[0][2])
    print("| variant | mean gain | " + " | ".join(columns) + " | s |")
    print("|---" * (len(columns) + 3) + "|")
    for gain, label, cells, seconds in rows:
        print(f"| {label} | {gain:+.1f} | " + " | ".join(f"{cells[c]:.1f}" for c in columns)
              + f" | {seconds:.0f} |")


if __name__ == "__main__":
    main()
