"""``flwr run .`` as a Flower user runs it: Flower's simulation runtime, our ServerApp, ClientApp.

A fresh ``FLWR_HOME``, the venv's ``bin`` on PATH, the one documented setting
(``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``), and this test's own ports for
the local SuperLink Flower starts (it reuses whatever answers on its port, so a
SuperLink of another run must never be found); the SuperLink is stopped by its PID.
The demo federation runs one round, a new site adapts its checkpoint, and a second
``flwr run`` on the finished run directory says, in Flower's log stream, that it is
finished.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medmeta.cli import main
from medmeta_common.config import load_config
from medmeta_common.errors import FederationError
from server.flwr_simulation import fit_to_nodes
from server.state import RunState
from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def superlink_pids(port: int) -> list[int]:
    """PIDs of flower-superlink processes listening on ``port`` (from their command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in args) and str(port).encode() in args:
            found.append(int(proc.name))
    return found


def stop(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)  # Flower starts it in its own session: its group
        except OSError:
            return
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.2)


@pytest.fixture
def flower_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    port = free_port()
    env = {**os.environ,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(tmp_path / "flwr_home"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        yield env
    finally:
        for pid in superlink_pids(port):
            stop(pid)


def flwr_run(env: dict[str, str], run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flwr"), "run", ".", "--stream", "--federation-config", "num-supernodes=3",
         "--run-config", f"rounds=1 run-dir='{run_dir}'"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_flwr_run_simulates_the_demo_and_a_new_site_adapts_it(
        flower_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    first = flwr_run(flower_env, run_dir)
    stream = first.stdout + first.stderr
    assert first.returncode == 0, stream[-3000:]
    # Our lines reach Flower's log stream: the round, its sites, epsilon per site.
    assert "round 1/1: 3/3 site update(s) accepted" in stream, stream[-3000:]
    assert "round 1: epsilon per site (spent/budget): hospital-a" in stream
    assert "site hospital-b: round 1/1: trained 20 DP-SGD step(s)" in stream
    assert "the run is finished: 1 rounds" in stream
    assert "deprecated" not in stream.lower()
    assert [p.name for p in RunState(run_dir).checkpoints()] == ["round-0001.pt"]
    assert sorted(p.name for p in (run_dir / "sites").iterdir()) == [
        "hospital-a", "hospital-b", "hospital-c"]

    code = main(["adapt", "--checkpoint", str(run_dir), "--data", "builtin:demo/site-3",
                 "--ways", "4", "--shots", "5", "--episodes", "20"])
    assert code == 0
    assert "4-way 5-shot accuracy" in capsys.readouterr().out

    again = flwr_run(flower_env, run_dir)
    assert "already FINISHED: all 1 of 1 rounds are done" in again.stdout + again.stderr
    assert [p.name for p in RunState(run_dir).checkpoints()] == ["round-0001.pt"]


def test_simulated_nodes_and_sites_must_fit() -> None:
    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert fit_to_nodes(demo, 3) == demo
    two = fit_to_nodes(demo, 2)  # hospital-c has no node: it takes no part
    assert [s.name for s in two.sites] == ["hospital-a", "hospital-b"]
    with pytest.raises(FederationError, match='num-supernodes=3'):
        fit_to_nodes(demo, 5)  # nodes without a site
    with pytest.raises(FederationError, match="fewer than federation 'demo's min_sites=2"):
        fit_to_nodes(demo, 1)
