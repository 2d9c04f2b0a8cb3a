"""Production on loopback, with real processes: a TLS SuperLink with node authentication,
three SuperNodes on real data, a site dying mid-run, the server killed and restarted.

One scenario (module fixture) runs three rounds: after round 1 one SuperNode is
killed; after round 2 the whole server (SuperLink and ServerApp) is killed and started
again. The tests then check each promise on what the scenario left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medmeta_common.pki import init_ca, server_certificate, site_keypair
from medmeta_common.privacy.accounting import epsilon_of
from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger
from server.state import RunState
from tests.conftest import SHARED_DATA, shared_file

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "medmeta.cli"]
SITES = {
    "hospital-a": "brain_tumor_mri/brain_tumor_mri_64.npz",
    "hospital-b": "pbc_blood/pbc_blood_5class_28.npz",
    "hospital-c": "medmnist/pneumoniamnist_28.npz",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition, timeout: float, what: str, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def checkpoint_rounds(state: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in RunState(state).checkpoints()]


@dataclass
class Scenario:
    root: Path
    server_yaml: Path
    state: Path
    site_yamls: dict[str, Path]
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    def start_site(self, name: str, config: Path | None = None) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("ab")
        return subprocess.Popen([*CLI, "site", "start", "--config",
                                 str(config or self.site_yamls[name])],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def server(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, "server", *args, "--config", str(self.server_yaml)],
                              capture_output=True, text=True, check=check, timeout=180)


def write_configs(root: Path, port: int) -> Scenario:
    pki = root / "pki"
    init_ca(pki, name="test consortium")
    server_certificate(pki, hosts=["localhost", "127.0.0.1"])
    keys = root / "keys"
    for name in [*SITES, "intruder"]:
        site_keypair(keys, name=name)
    other = root / "other-pki"
    init_ca(other, name="someone else")
    registered = "\n".join(f"  - {{name: {n}, public_key: keys/{n}.pub}}" for n in SITES)
    server_yaml = root / "server.yaml"
    server_yaml.write_text(f"""kind: server
name: loopback-e2e
rounds: 3
state_dir: state/server
image: {{size: 32, channels: 1}}
train: {{local_steps: 3, batch_size: 16}}
evaluation: {{ways: 2, shots: 3, queries: 3, episodes: 5}}
server: {{min_sites: 2, round_timeout: 240}}
superlink: {{host: 127.0.0.1, port: {port}, certificates: pki}}
sites:
{registered}
""")
    site_yamls = {}
    for name, data in [*SITES.items(), ("intruder", "medmnist/breastmnist_28.npz")]:
        site_yaml = root / f"{name}.yaml"
        site_yaml.write_text(f"""kind: site
name: {name}
data: {{path: {SHARED_DATA / data}, partition: {{parts: 12, index: 0}}}}
state_dir: state/{name}
privacy: {{epsilon: 50.0, noise_multiplier: 1.0}}
superlink: 127.0.0.1:{port}
root_certificate: pki/ca.crt
private_key: keys/{name}.key
port: {free_port()}
""")
        site_yamls[name] = site_yaml
    wrong_ca = root / "wrong-ca.yaml"
    wrong_ca.write_text(site_yamls["hospital-a"].read_text().replace("pki/ca.crt",
                                                                      "other-pki/ca.crt"))
    site_yamls["wrong-ca"] = wrong_ca
    return Scenario(root, server_yaml, root / "state" / "server", site_yamls)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    for relative in SITES.values():
        shared_file(relative)
    root = tmp_path_factory.mktemp("deploy")
    run = write_configs(root, free_port())
    try:
        run.server("start")
        run.notes["wrong_ca"] = subprocess.run(
            [*CLI, "site", "check", "--config", str(run.site_yamls["wrong-ca"])],
            capture_output=True, text=True, timeout=120)
        intruder = run.start_site("intruder")
        for name in SITES:
            run.nodes[name] = run.start_site(name)
        intruder.wait(timeout=120)
        run.notes["intruder_code"] = intruder.returncode
        run.notes["intruder_log"] = (root / "intruder.log").read_text(errors="replace")

        wait_for(lambda: 1 in checkpoint_rounds(run.state), 300, "round 1")
        os.killpg(run.nodes["hospital-c"].pid, signal.SIGKILL)  # a site dies mid-run
        # The server crashes as soon as round 2 is checkpointed, before round 3 can
        # finish (polled fast: a 3-step round takes seconds).
        wait_for(lambda: 2 in checkpoint_rounds(run.state), 400, "round 2 without hospital-c",
                 poll=0.1)
        pid = int((run.state / "superlink.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
        run.notes["rounds_at_crash"] = checkpoint_rounds(run.state)
        run.notes["ledgers_at_crash"] = {
            n: read_ledger(root / "state" / n / LEDGER_FILE).steps for n in SITES}
        run.notes["status_before_crash"] = json.loads(run.server("status", "--json").stdout)
        time.sleep(2)
        run.server("start")  # restarted: it must resume after round 2
        wait_for(lambda: 3 in checkpoint_rounds(run.state), 400, "round 3 after the restart")
        run.notes["status_after"] = json.loads(run.server("status", "--json").stdout)
    finally:
        run.server("stop", check=False)
        for process in run.nodes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
    return run


def test_federation_with_tls_and_node_auth_finishes(scenario: Scenario) -> None:
    assert checkpoint_rounds(scenario.state)[-1] == 3
    rounds = [(r["round"], r["phase"]) for r in RunState(scenario.state).read_metrics()]
    assert [r for r in rounds if r[1] == "train"] == [(1, "train"), (2, "train"), (3, "train")]
    first = next(r for r in RunState(scenario.state).read_metrics() if r["phase"] == "train")
    # Round 1 starts once min_sites (2) are connected; every site is known by its name.
    assert set(first["sites"]) <= set(SITES) and len(first["sites"]) >= 2
    assert all(s["status"] == "accepted" for s in first["sites"].values())


def test_unregistered_node_is_refused(scenario: Scenario) -> None:
    assert scenario.notes["intruder_code"] != 0
    assert "its key is not registered" in str(scenario.notes["intruder_log"])


def test_site_with_the_wrong_ca_cannot_connect(scenario: Scenario) -> None:
    result = scenario.notes["wrong_ca"]
    assert result.returncode != 0  # type: ignore[attr-defined]
    assert "does not vouch for" in result.stderr  # type: ignore[attr-defined]


def test_round_completes_without_the_dead_site(scenario: Scenario) -> None:
    metrics = RunState(scenario.state).read_metrics()
    later = [r for r in metrics if r["phase"] == "train" and r["round"] >= 2]
    for record in later:
        assert record["accepted"] == 2
        assert "hospital-c" not in record["sites"] or \
            record["sites"]["hospital-c"]["status"] != "accepted"


def test_restarted_server_resumed_without_repeating_or_losing(scenario: Scenario) -> None:
    assert scenario.notes["rounds_at_crash"] == [1, 2]
    assert scenario.notes["status_before_crash"]["rounds_done"] == 2  # type: ignore[index]
    assert scenario.notes["status_after"]["rounds_done"] == 3  # type: ignore[index]
    for name in ("hospital-a", "hospital-b"):
        ledger = read_ledger(scenario.root / "state" / name / LEDGER_FILE)
        # Every round the site trained is in its ledger once, with its steps, and the
        # epsilon it reports is the accountant's value for exactly those steps.
        assert ledger.steps == 3 * len(ledger.rounds)
        assert ledger.steps > scenario.notes["ledgers_at_crash"][name]  # type: ignore[index]
        assert ledger.epsilon == pytest.approx(epsilon_of(ledger.history, ledger.delta,
                                                                 ledger.accountant))
        assert [r.round for r in ledger.rounds][-1] == 3
