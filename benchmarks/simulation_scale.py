"""Simulated federations: round time beside the sites' own compute, up to 1000 sites.

``--sites N`` real sites are cut from the blood-cell training set (PBC, 8k images,
``partition: {parts: N}``), or with ``--synthetic`` N synthetic sites are drawn from
the built-in demo (400 images each, a site's own seed: enough for a valid episode and
a sampling rate at any N), every site under DP at epsilon 8, the shipped method
(configs/benchmark.yaml). ``medmeta simulate``'s engine runs the rounds: the real
Strategy and ClientApp through the in-process Grid, one site after another with
``--cpus-per-site`` torch threads. Memory is the summed proportional set size (PSS)
of this process and any it started, sampled every second.

The baseline, from the same run: each site's own local compute (``compute-seconds``,
measured inside its round: data, training, ledger), summed over the round's sites —
what the round would cost with no federation machinery at all. The ratio of the
round's wall time to it is the federation's overhead (messages, copies, checks,
aggregation, checkpoint, metrics).

    python benchmarks/simulation_scale.py --sites 10 --rounds 3
    python benchmarks/simulation_scale.py --sites 100 --fraction 0.1 --rounds 2
    python benchmarks/simulation_scale.py --synthetic --sites 1000 --fraction 0.01 --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

from medmeta_common.config import (
    DataConfig,
    FederationConfig,
    PartitionConfig,
    SiteConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


class PeakMemory:
    """Peak summed PSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, root_pid: int, interval: float = 1.0) -> None:
        self.root_pid, self.interval, self.peak = root_pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss(pid) for pid in self._tree()))
            self._stop.wait(self.interval)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
        found, todo = [], [self.root_pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def federation(base: FederationConfig, data: Path, sites: int, rounds: int,
               fraction: float, synthetic: bool = False) -> FederationConfig:
    """``sites`` blood-cell sites (disjoint partitions of PBC), or synthetic demo sites."""
    path = str(data / "pbc_blood" / "pbc_blood_5class_28.npz")
    configs = tuple(SiteConfig(name=f"site-{i:04d}",
                               data=DataConfig(path=f"builtin:demo/site-{i % 3}", split=None,
                                               split_seed=i)
                               if synthetic else
                               DataConfig(path=path,
                                          partition=PartitionConfig(parts=sites, index=i)))
                    for i in range(sites))
    server = replace(base.server, fraction_train=fraction, fraction_evaluate=0.0, min_sites=2)
    return replace(base, name=f"scale-{sites}", sites=configs, rounds=rounds, server=server,
                   held_out=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "benchmark.yaml")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--synthetic", action="store_true",
                        help="synthetic demo sites (400 images each) instead of PBC parts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=1.0, help="sites sampled per round")
    parser.add_argument("--cpus-per-site", type=float, default=1.0,
                        help="torch threads per simulated site (sites train one at a time)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from medmeta.simulate import run_simulation
    from server.state import RunState

    config = federation(load_config(args.config), args.data, args.sites, args.rounds,
                        args.fraction, args.synthetic)
    config = replace(config, runtime=replace(config.runtime, cpus_per_site=args.cpus_per_site))
    kind = "synthetic demo" if args.synthetic else "PBC"
    print(f"# simulated federation: {args.sites} {kind} sites, {args.fraction:g} sampled per "
          f"round, {args.rounds} rounds, DP epsilon 8, {config.train.local_steps} local steps, "
          f"{args.cpus_per_site:g} CPU(s) per site; "
          f"{platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        started, cpu = time.monotonic(), time.process_time()
        with PeakMemory(os.getpid()) as memory:
            run_simulation(config, Path(tmp) / "sim")
        wall, cpu = time.monotonic() - started, time.process_time() - cpu
        rounds = [r for r in RunState(Path(tmp) / "sim").read_metrics() if r["phase"] == "train"]
        print(f"simulation: {wall:.1f} s in all, peak memory {memory.peak / 2**30:.2f} GiB "
              f"(PSS, all processes); CPU time of this process: {cpu:.1f} s")
        ratios = []
        for r in rounds:
            compute = sum(float(site.get("compute-seconds", 0)) for site in r["sites"].values())
            ratios.append(float(r["seconds"]) / compute if compute else float("nan"))
            print(f"  round {r['round']}: {r['seconds']:.1f} s, {r['accepted']} sites trained, "
                  f"their compute {compute:.1f} s summed (baseline), ratio {ratios[-1]:.2f}x")
        later = ratios[1:] or ratios
        print(f"median ratio after the first round: {statistics.median(later):.2f}x; first "
              f"round: {ratios[0]:.2f}x; median round after the first: "
              f"{statistics.median([float(r['seconds']) for r in rounds[1:] or rounds]):.1f} s")


if __name__ == "__main__":
    main()
