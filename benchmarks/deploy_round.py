"""A deployed round beside the compute it contains, and what each message costs to start.

Starts a real SuperLink and three SuperNodes on loopback (insecure, to time our part
rather than TLS) through ``medmeta server start`` / ``medmeta site start``, runs the
built-in demo with the shipped default method (``configs/demo.yaml``: the Lite0 prior,
FiLM, its local steps, batch, evaluation and epsilon), and reports, from one run:

- ``round_s``: the median deployed round wall time — the time between consecutive
  rounds' train records on the server (so any evaluate messages are inside it);
- ``site_compute_s``: the slowest site's compute inside that round, as the site
  measured it (``compute-seconds`` in its train reply: validation and training);
- ``bare_compute_s``: the same rounds' compute run back to back in this process,
  without Flower (the slowest site, median over the same rounds) — the baseline;
- ``startup_s``: our ClientApp start-up per message type, from the sites' own
  ``message_times.jsonl`` (process spawn, or task hand-over, to the handler ready);
- ``flower_s``: what is left — ``round_s`` minus the compute and our start-up of the
  slowest site's train message: Flower's polls and messaging.

Both the default (a runner started ahead of each task, ``runtime.prestart_runner``)
and cold starts (``prestart_runner: false``) are run.

    python benchmarks/deploy_round.py            # 4 rounds, ~4 min on 2 CPU cores
    python benchmarks/deploy_round.py --json     # the figures as one JSON object
"""

from __future__ import annotations

import argparse
import copy
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CLI = [sys.executable, "-m", "medmeta.cli"]
SITES = ("site-0", "site-1", "site-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(folder: Path, rounds: int, prestart: bool) -> tuple[Path, list[Path]]:
    """The operator's server.yaml (the shipped method of configs/demo.yaml) and 3 sites."""
    import yaml

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    method = {key: demo[key] for key in ("seed", "image", "model", "train", "evaluation")}
    port = free_port()
    server = folder / "server.yaml"
    server.write_text(yaml.safe_dump({
        "kind": "server", "name": "overhead", "rounds": rounds, "state_dir": "state/server",
        **method, "server": {**demo["server"], "min_sites": len(SITES)},
        "superlink": {"host": "127.0.0.1", "port": port, "insecure": True}}))
    epsilon = demo["privacy"]["epsilon"]
    sites = []
    for name in SITES:
        path = folder / f"{name}.yaml"
        path.write_text(f"""kind: site
name: {name}
data: {{path: "builtin:demo/{name}", split: null}}
state_dir: state/{name}
privacy: {{epsilon: {epsilon}}}
superlink: 127.0.0.1:{port}
insecure: true
port: {free_port()}
""" + ("" if prestart else "runtime: {prestart_runner: false}\n"))
        sites.append(path)
    return server, sites


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line still being written
            break
    return out


def deployment(rounds: int, prestart: bool) -> dict[str, Any]:
    """Run the loopback federation; return the server's records and the sites' times."""
    with tempfile.TemporaryDirectory(prefix="medmeta-overhead-") as tmp:
        folder = Path(tmp)
        server, sites = write(folder, rounds, prestart)
        subprocess.run([*CLI, "-q", "server", "start", "--config", str(server)], check=True,
                       capture_output=True)
        nodes = [subprocess.Popen([*CLI, "-q", "site", "start", "--config", str(s)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True) for s in sites]
        metrics = folder / "state" / "server" / "metrics.jsonl"
        try:
            deadline = time.monotonic() + 1200
            while time.monotonic() < deadline:
                seen = _read_jsonl(metrics)
                if any(r["phase"] == "evaluate" and r["round"] == rounds for r in seen):
                    break
                if any(node.poll() is not None for node in nodes):
                    raise RuntimeError("a site stopped during the benchmark")
                time.sleep(0.2)
            else:
                raise RuntimeError("the deployment did not finish in 20 minutes")
        finally:
            subprocess.run([*CLI, "-q", "server", "stop", "--config", str(server)],
                           capture_output=True)
            for node in nodes:
                if node.poll() is None:
                    node.send_signal(signal.SIGTERM)
            for node in nodes:
                node.wait(timeout=60)
        return {"records": _read_jsonl(metrics),
                "messages": {n: _read_jsonl(folder / "state" / n / "message_times.jsonl")
                             for n in SITES}}


def round_figures(run: dict[str, Any]) -> dict[str, Any]:
    """``round_s``, ``site_compute_s`` and start-up per message type of one deployment."""
    train = [r for r in run["records"] if r["phase"] == "train"]
    later = train[1:]  # the first round pays the sites' first connection
    cycles = [b["time"] - a["time"] for a, b in zip(train, later, strict=False)]
    compute = [max(float(s.get("compute-seconds", 0.0)) for s in r["sites"].values())
               for r in later]
    startup: dict[str, Any] = {}
    for kind in ("train", "evaluate"):
        lines = [m for site in run["messages"].values() for m in site
                 if m["type"] == kind and (kind != "train" or m["round"] > 1)]
        for key in ("spawn_to_ready_s", "task_to_ready_s", "spawn_to_handler_s"):
            values = [m[key] for m in lines if m.get(key) is not None]
            startup[f"{kind}_{key}"] = round(statistics.median(values), 3) if values else None
    slowest_train_startup = [
        max((m["task_to_ready_s"] or 0.0) for site in run["messages"].values() for m in site
            if m["type"] == "train" and m["round"] == r["round"]) for r in later
        if any(m["type"] == "train" and m["round"] == r["round"]
               for site in run["messages"].values() for m in site)]
    phases = _phases(run, later)
    round_s = statistics.median(cycles)
    site_compute_s = statistics.median(compute)
    ours = statistics.median(slowest_train_startup) if slowest_train_startup else None
    return {"round_s": round(round_s, 3), "site_compute_s": round(site_compute_s, 3),
            "overhead_s": round(round_s - site_compute_s, 3),
            "our_startup_s": None if ours is None else round(ours, 3),
            "flower_s": None if ours is None else round(round_s - site_compute_s - ours, 3),
            "rounds_s": [round(c, 3) for c in cycles],
            "slowest_site_phases_s": phases,
            "startup_s": startup,
            "messages_per_round": _messages_per_round(run)}


def _phases(run: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Where a round's time goes, for the site whose reply came last (medians).

    ``to_task``: round start on the server to the site's runner holding the task
    (the server's push, the SuperNode's 3 s poll, the launcher's poll); ``ready``: our
    start-up; ``compute``; ``to_server``: the handler's end to the round's record
    (reply push, the SuperNode's reply poll, the server's reply poll, aggregation).
    """
    rows: dict[str, list[float]] = {"to_task": [], "ready": [], "compute": [], "to_server": []}
    for record in rounds:
        begin, end = record["time"] - record["seconds"], record["time"]
        lines = [m for site in run["messages"].values() for m in site
                 if m["type"] == "train" and m["round"] == record["round"]
                 and begin <= m["time"] <= end]
        if not lines or any(m["task_to_ready_s"] is None for m in lines):
            continue
        last = max(lines, key=lambda m: m["time"])
        task_at = last["time"] - last["compute_s"] - last["task_to_ready_s"]
        for key, value in (("to_task", task_at - begin), ("ready", last["task_to_ready_s"]),
                           ("compute", last["compute_s"]), ("to_server", end - last["time"])):
            rows[key].append(value)
    return {k: round(statistics.median(v), 3) for k, v in rows.items() if v}


def _messages_per_round(run: dict[str, Any]) -> float | None:
    lines = [m for site in run["messages"].values() for m in site if m["type"] != "query"]
    rounds = {m["round"] for m in lines}
    return round(len(lines) / (len(rounds) * len(SITES)), 2) if rounds else None


def bare_compute(rounds: int) -> list[float]:
    """The deployed rounds' compute back to back here (per round, the slowest site).

    Each site validates the encoder it receives (rounds after the first, as deployed
    rounds do in their train messages) and trains, with the server's own settings.
    """
    import torch

    import client.round
    from client.prior import round_encoder
    from client.round import evaluate_round, train_round
    from client.settings import SiteRuntime, read_settings
    from medmeta_common.config import DataConfig, PrivacyConfig, load_config
    from medmeta_common.config.deploy import load_server_config
    from medmeta_common.models.prior import prior_sha256
    from server.app import settings_record

    torch.set_num_threads(1)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        server, _ = write(Path(tmp), rounds, prestart=False)
        config = load_server_config(server)
        demo = load_config(ROOT / "configs" / "demo.yaml")
        config_privacy = PrivacyConfig(epsilon=demo.privacy.epsilon)
        sites = [SiteRuntime(name=n, data=DataConfig(path=f"builtin:demo/{n}", split=None),
                             state_dir=Path(tmp) / n, privacy=config_privacy)
                 for n in SITES]
        record = dict(settings_record(config, prior_sha256(config.model.weights)))
        encoder = None
        for r in range(1, rounds + 1):
            settings = read_settings({**record, "server-round": r})
            if encoder is None:
                encoder = round_encoder(settings, sites[0])
            times = []
            for site in sites:
                if hasattr(client.round, "prepare_round"):  # (not in older versions)
                    client.round.prepare_round(site, settings, train=True)
                start = time.perf_counter()
                if r > 1:
                    evaluate_round(site, settings, copy.deepcopy(encoder))
                train_round(site, settings, copy.deepcopy(encoder))
                if r == rounds:  # the last round's separate evaluation
                    evaluate_round(site, settings, copy.deepcopy(encoder))
                times.append(time.perf_counter() - start)
            out.append(max(times))
    return out


COLD_PROBE = """
import json, sys
from pathlib import Path
from client.startup import process_age
import client.app_runner  # the runner's own imports (Flower's Runtime API client, policy)
from client.app_runner import load_installed_app
load_installed_app()
from client.prior import round_encoder
from client.round import prepare_round
from client.settings import SiteRuntime, read_settings
from medmeta_common.config import DataConfig, PrivacyConfig
record, kind, state = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
settings = read_settings(record)
site = SiteRuntime(name="site-0", data=DataConfig(path="builtin:demo/site-0", split=None),
                   state_dir=state, privacy=PrivacyConfig(epsilon=8.0))
encoder = round_encoder(settings, site)
prepare_round(site, settings, train=kind == "train")
print(process_age())
"""


def quiet_cold_starts(repeats: int = 3) -> dict[str, float]:
    """Spawn to ready of one message on a quiet machine (median of ``repeats``).

    A fresh ``python -P`` process does what a cold runner does before its compute —
    the runner's imports, the ClientApp's, the encoder from its prior, the site's
    cached data and, for a train message under DP, Opacus — without Flower's Runtime
    API calls (~0.1-0.5 s on loopback, in ``task_to_input_s`` of a deployment).
    """
    from medmeta_common.config.deploy import load_server_config
    from medmeta_common.models.prior import prior_sha256
    from server.app import settings_record

    with tempfile.TemporaryDirectory() as tmp:
        server, _ = write(Path(tmp), 4, prestart=False)
        config = load_server_config(server)
        record = {**dict(settings_record(config, prior_sha256(config.model.weights))),
                  "server-round": 2}
        state = Path(tmp) / "site-0"

        def once(kind: str) -> float:
            out = subprocess.run([sys.executable, "-P", "-c", COLD_PROBE, json.dumps(record),
                                  kind, str(state)], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
            return float(out.strip().splitlines()[-1])

        once("train")  # fills the site's data cache and hash record, as a first round does
        return {kind: round(statistics.median(once(kind) for _ in range(repeats)), 3)
                for kind in ("evaluate", "train")}


def import_seconds() -> float:
    """What a fresh process pays to import our ClientApp (median of three)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import client.app"], cwd=ROOT, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-cold", action="store_true",
                        help="skip the cold-start deployment (versions without prestart)")
    args = parser.parse_args()
    imports = import_seconds()
    quiet = quiet_cold_starts()
    bare = bare_compute(args.rounds)
    warm = round_figures(deployment(args.rounds, prestart=True))
    cold = None if args.no_cold else round_figures(deployment(args.rounds, prestart=False))
    bare_s = statistics.median(bare[1:] or bare)
    result = {"round_s": warm["round_s"], "site_compute_s": warm["site_compute_s"],
              "bare_compute_s": round(bare_s, 3),
              "overhead_s": warm["overhead_s"],
              "startup_s": warm["startup_s"], "our_startup_s": warm["our_startup_s"],
              "flower_s": warm["flower_s"], "messages_per_round": warm["messages_per_round"],
              "slowest_site_phases_s": warm["slowest_site_phases_s"],
              "rounds_s": warm["rounds_s"],
              "cold": cold, "client_app_import_s": round(imports, 3),
              "quiet_cold_spawn_to_ready_s": quiet,
              "rounds": args.rounds, "sites": len(SITES)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"# deployed round overhead: {len(SITES)} sites (built-in demo), {args.rounds} "
          "rounds, the shipped default method, loopback, insecure")
    print(f"bare compute, same rounds in one process (baseline): {bare_s:.2f} s per round "
          "(slowest site, median)")
    for label, row in (("runner started ahead (default)", warm), ("cold start", cold)):
        if row is None:
            continue
        print(f"{label}: round {row['round_s']:.2f} s (rounds 2..: {row['rounds_s']}); "
              f"site compute {row['site_compute_s']:.2f} s; round - compute "
              f"{row['overhead_s']:.2f} s (target <= 6 s); our start-up {row['our_startup_s']} "
              f"s; Flower {row['flower_s']} s; messages per site per round "
              f"{row['messages_per_round']}")
        print(f"  start-up per message type: {row['startup_s']}")
        print(f"  slowest site's round (median s): {row['slowest_site_phases_s']}")
    print(f"import of client.app in a fresh process: {imports:.2f} s; cold start on a quiet "
          f"machine, spawn to ready (targets: evaluate <= 1.5 s, train <= 2.5 s): {quiet}")


if __name__ == "__main__":
    main()
