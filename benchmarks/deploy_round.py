"""Round overhead on Flower's deployment engine, beside the bare compute it contains.

Starts a real SuperLink and three SuperNodes on loopback (insecure, to time our part
rather than TLS), runs a few rounds of the built-in demo, and reports the server's
round wall time next to (a) each site's own compute time inside the round and (b) the
same local training run back-to-back in this process without Flower (the baseline).
It also times the fixed costs each message pays in a fresh ClientApp process (imports,
data loading), with the site data cache on and off.

    python benchmarks/deploy_round.py               # 3 rounds, ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CLI = [sys.executable, "-m", "medmeta.cli"]
SITES = ("site-0", "site-1", "site-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(folder: Path, rounds: int, cache: bool, evaluate_every: int
          ) -> tuple[Path, list[Path]]:
    port = free_port()
    server = folder / "server.yaml"
    server.write_text(f"""kind: server
name: overhead
rounds: {rounds}
state_dir: state/server
train: {{local_steps: 20, batch_size: 32}}
evaluation: {{ways: 3, shots: 5, queries: 5, episodes: 20}}
server: {{min_sites: 3, evaluate_every: {evaluate_every}}}
superlink: {{host: 127.0.0.1, port: {port}, insecure: true}}
""")
    sites = []
    for name in SITES:
        path = folder / f"{name}.yaml"
        path.write_text(f"""kind: site
name: {name}
data: {{path: "builtin:demo/{name}", split: null}}
state_dir: state/{name}
privacy: {{epsilon: 50.0, noise_multiplier: 1.0}}
superlink: 127.0.0.1:{port}
insecure: true
port: {free_port()}
cache_data: {str(cache).lower()}
""")
        sites.append(path)
    return server, sites


def deployment(rounds: int, cache: bool, evaluate_every: int = 1) -> dict:
    """Run the loopback federation; return per-round server and site times.

    A train record's ``seconds`` covers the train messages only; the cycle from one
    train record to the next (timed here as the records appear) adds the evaluation.
    """
    with tempfile.TemporaryDirectory(prefix="medmeta-overhead-") as tmp:
        folder = Path(tmp)
        server, sites = write(folder, rounds, cache, evaluate_every)
        subprocess.run([*CLI, "-q", "server", "start", "--config", str(server)], check=True,
                       capture_output=True)
        nodes = [subprocess.Popen([*CLI, "-q", "site", "start", "--config", str(s)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True) for s in sites]
        metrics = folder / "state" / "server" / "metrics.jsonl"
        try:
            deadline = time.monotonic() + 900
            train_seen: list[float] = []
            while time.monotonic() < deadline:
                lines = metrics.read_text().splitlines() if metrics.exists() else []
                try:
                    seen = [json.loads(line) for line in lines]
                except ValueError:  # a line still being written
                    seen = []
                trained = sum(r["phase"] == "train" for r in seen)
                train_seen += [time.monotonic()] * (trained - len(train_seen))
                if any(r["phase"] == "evaluate" and r["round"] == rounds for r in seen):
                    break
                time.sleep(0.2)
        finally:
            subprocess.run([*CLI, "-q", "server", "stop", "--config", str(server)],
                           capture_output=True)
            for node in nodes:
                if node.poll() is None:
                    node.send_signal(signal.SIGTERM)
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    return {
        "round_seconds": [r["seconds"] for r in train],
        "cycle_seconds": [b - a for a, b in itertools.pairwise(train_seen)],
        "site_compute": [max(m.get("compute-seconds", 0) for m in r["sites"].values())
                         for r in train],
    }


def bare_compute(rounds: int) -> list[float]:
    """The same local rounds, back-to-back in this process (max over the three sites)."""
    import torch

    from client.round import train_round
    from client.settings import RoundSettings, SiteRuntime
    from medmeta_common.config import (
        DataConfig,
        FewShotConfig,
        ImageConfig,
        ModelConfig,
        PrivacyConfig,
        TrainConfig,
    )
    from medmeta_common.models.factory import build_encoder

    torch.set_num_threads(1)
    image, model = ImageConfig(), ModelConfig()
    encoder = build_encoder(model, image, 0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        sites = [SiteRuntime(name=n, data=DataConfig(path=f"builtin:demo/{n}", split=None),
                             state_dir=Path(tmp) / n,
                             privacy=PrivacyConfig(epsilon=50.0, noise_multiplier=1.0))
                 for n in SITES]
        for r in range(1, rounds + 1):
            settings = RoundSettings(image, model, TrainConfig(local_steps=20, batch_size=32),
                                     FewShotConfig(), rounds, r, 0)
            times = []
            for site in sites:
                start = time.perf_counter()
                train_round(site, settings, copy.deepcopy(encoder))
                times.append(time.perf_counter() - start)
            out.append(max(times))
    return out


def import_seconds() -> float:
    """What a fresh ClientApp process pays to import our client code."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import client.app"], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"# deployment round overhead: 3 sites (built-in demo), {args.rounds} rounds, "
          "20 local DP steps per round, loopback, insecure")
    imports = import_seconds()
    bare = bare_compute(args.rounds)
    rows = {f"cache {'on' if c else 'off'}": deployment(args.rounds, c) for c in (False, True)}
    rows[f"cache on, evaluate_every {args.rounds}"] = deployment(args.rounds, True, args.rounds)
    print(f"import of client.app in a fresh process: {imports:.1f} s")
    print(f"bare compute, same rounds in one process (baseline): median "
          f"{statistics.median(bare):.1f} s per round (max over sites)")
    for label, row in rows.items():
        later = row["round_seconds"][1:] or row["round_seconds"]
        compute = row["site_compute"][1:] or row["site_compute"]
        print(f"deployment, data {label}: round wall time median {statistics.median(later):.1f} s"
              f" (rounds after the first: {', '.join(f'{x:.1f}' for x in later)}); site compute "
              f"inside it median {statistics.median(compute):.1f} s; "
              f"overhead {statistics.median(later) / statistics.median(bare):.1f}x the bare "
              f"compute; train-to-train cycle (with any evaluation) median "
              f"{statistics.median(row['cycle_seconds']):.1f} s")


if __name__ == "__main__":
    main()
