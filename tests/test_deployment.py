"""Production on loopback, with real processes: a TLS SuperLink with node authentication,
four SuperNodes on real data (three classification sites and a detection site on BCCD
blood smears), a site dying mid-run, the server killed and restarted.

One scenario (module fixture) runs three rounds: after round 1 one SuperNode is
killed; after round 2 the whole server (SuperLink and ServerApp) is killed and started
again. The tests then check each promise on what the scenario left behind.
"""

from __future__ import annotations

import json
import os
import re
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
from server.superlink import flower_env
from tests.conftest import SHARED_DATA, shared_file

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "medmeta.cli"]
SITES = {
    "detection-lab": "bccd/BCCD",
    "hospital-a": "brain_tumor_mri/brain_tumor_mri_64.npz",
    "hospital-b": "pbc_blood/pbc_blood_5class_28.npz",
    "hospital-c": "medmnist/pneumoniamnist_28.npz",
}
# What a site's YAML adds to its data path (the detection site: its task and tiles).
SITE_EXTRAS = {"detection-lab": ("task: detection\ntile: 240\n", "split: train, ")}


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
        task, data_extra = SITE_EXTRAS.get(name, ("", ""))
        site_yaml.write_text(f"""kind: site
name: {name}
{task}data: {{path: {SHARED_DATA / data}, {data_extra}partition: {{parts: 12, index: 0}}}}
state_dir: state/{name}
privacy: {{epsilon: 50.0, noise_multiplier: 1.0}}
superlink: 127.0.0.1:{port}
root_certificate: pki/ca.crt
private_key: keys/{name}.key
port: {free_port()}
""")
        site_yamls[name] = site_yaml
    swapped = root / "swapped-key.yaml"  # hospital-a's config with hospital-b's key
    swapped.write_text(site_yamls["hospital-a"].read_text().replace("keys/hospital-a.key",
                                                                    "keys/hospital-b.key"))
    site_yamls["swapped-key"] = swapped
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
        for name in ("wrong-ca", "intruder", "swapped-key", "hospital-a"):
            run.notes[f"check:{name}"] = subprocess.run(
                [*CLI, "site", "check", "--config", str(run.site_yamls[name])],
                capture_output=True, text=True, timeout=120)
        intruder = run.start_site("intruder")
        for name in SITES:
            run.nodes[name] = run.start_site(name)
        intruder.wait(timeout=120)
        run.notes["intruder_code"] = intruder.returncode
        run.notes["intruder_log"] = (root / "intruder.log").read_text(errors="replace")

        wait_for(lambda: 1 in checkpoint_rounds(run.state), 300, "round 1")
        # A site that trained round 1 dies (round 1 starts once min_sites are connected,
        # so the third site may have joined only later).
        first = next(r for r in RunState(run.state).read_metrics() if r["phase"] == "train")
        dead = sorted(first["sites"])[-1]
        run.notes["dead"] = dead
        run.notes["survivors"] = [n for n in SITES if n != dead]
        os.killpg(run.nodes[dead].pid, signal.SIGKILL)  # a site dies mid-run
        # The server crashes as soon as round 2 is checkpointed, before round 3 can
        # finish (polled fast: a 3-step round takes seconds).
        wait_for(lambda: 2 in checkpoint_rounds(run.state), 400, f"round 2 without {dead}",
                 poll=0.1)
        pid = int((run.state / "superlink.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
        run.notes["rounds_at_crash"] = checkpoint_rounds(run.state)
        run.notes["ledgers_at_crash"] = {
            n: read_ledger(root / "state" / n / LEDGER_FILE).steps
            for n in run.notes["survivors"]}  # type: ignore[attr-defined]
        run.notes["status_before_crash"] = json.loads(run.server("status", "--json").stdout)
        time.sleep(2)
        run.server("start")  # restarted: it must resume after round 2
        wait_for(lambda: 3 in checkpoint_rounds(run.state), 400, "round 3 after the restart")
        run.notes["status_after"] = json.loads(run.server("status", "--json").stdout)
        run.notes["status_text"] = run.server("status").stdout
        wait_for(lambda: "run finished" in (root / "hospital-a.log").read_text(errors="replace"),
                 180, "the sites to hear that the run finished")
        run_id = json.loads((run.state / "run.json").read_text())["run-id"]
        run.notes["flwr_log"] = subprocess.run(
            ["flwr", "log", str(run_id), "medmeta", "--show"], env=flower_env(run.state),
            capture_output=True, text=True, timeout=120).stdout
        run.notes["finished_again"] = run.server("start", check=False)
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
    result = scenario.notes["check:wrong-ca"]
    assert result.returncode != 0  # type: ignore[attr-defined]
    assert "does not vouch for" in result.stderr  # type: ignore[attr-defined]


def test_site_check_shakes_hands_and_names_each_key_problem(scenario: Scenario) -> None:
    ok = scenario.notes["check:hospital-a"]
    registered = json.loads((scenario.state / "sites.json").read_text())
    assert ok.returncode == 0, ok.stderr  # type: ignore[attr-defined]
    assert f"the SuperLink knows this site's key (node {registered['hospital-a']})" in \
        ok.stdout  # type: ignore[attr-defined]
    intruder = scenario.notes["check:intruder"]
    assert intruder.returncode != 0  # type: ignore[attr-defined]
    assert "does not accept site intruder's key" in intruder.stderr  # type: ignore[attr-defined]
    swapped = scenario.notes["check:swapped-key"]
    assert swapped.returncode != 0  # type: ignore[attr-defined]
    assert "is the key of site 'hospital-b'" in swapped.stderr  # type: ignore[attr-defined]


def test_operator_and_sites_see_names_rounds_and_the_end(scenario: Scenario) -> None:
    view = scenario.notes["status_after"]["view"]  # type: ignore[index]
    assert set(view["sites"]) == set(SITES)  # registered names, never node-<id>
    assert view["sites"]["hospital-a"]["epsilon_budget"] == 50.0
    text = str(scenario.notes["status_text"])
    assert str(scenario.notes["dead"]) in text and "last report" in text and "of 50" in text
    # The ServerApp's own lines reach `flwr log` (the restarted run did round 3).
    logs = str(scenario.notes["flwr_log"])
    assert "round 3/3: " in logs and "epsilon per site (spent/budget)" in logs
    site_log = (scenario.root / "hospital-a.log").read_text(errors="replace")
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d medmeta INFO: site hospital-a: "
                     r"round \d/3: trained 3 DP-SGD step\(s\)", site_log)
    assert "run finished: 3 round(s) done" in site_log
    assert "UserWarning" not in site_log and "Optimal order" not in site_log
    again = scenario.notes["finished_again"]
    assert again.returncode != 0  # type: ignore[attr-defined]
    assert "already FINISHED: 3 of 3 rounds" in again.stderr  # type: ignore[attr-defined]


def test_round_completes_without_the_dead_site(scenario: Scenario) -> None:
    metrics = RunState(scenario.state).read_metrics()
    later = [r for r in metrics if r["phase"] == "train" and r["round"] >= 2]
    for record in later:
        assert record["accepted"] == len(SITES) - 1
        dead = str(scenario.notes["dead"])
        assert dead not in record["sites"] or record["sites"][dead]["status"] != "accepted"


def test_restarted_server_resumed_without_repeating_or_losing(scenario: Scenario) -> None:
    assert scenario.notes["rounds_at_crash"] == [1, 2]
    assert scenario.notes["status_before_crash"]["rounds_done"] == 2  # type: ignore[index]
    assert scenario.notes["status_after"]["rounds_done"] == 3  # type: ignore[index]
    for name in scenario.notes["survivors"]:  # type: ignore[attr-defined]
        ledger = read_ledger(scenario.root / "state" / name / LEDGER_FILE)
        # Every round the site trained is in its ledger once, with its steps, and the
        # epsilon it reports is the accountant's value for exactly those steps.
        assert ledger.steps == 3 * len(ledger.rounds)
        assert ledger.steps > scenario.notes["ledgers_at_crash"][name]  # type: ignore[index]
        assert ledger.epsilon == pytest.approx(epsilon_of(ledger.history, ledger.delta,
                                                                 ledger.accountant))
        assert [r.round for r in ledger.rounds][-1] == 3


def test_the_detection_site_trains_and_reports_map_through_the_deployment(
        scenario: Scenario) -> None:
    if scenario.notes["dead"] == "detection-lab":
        pytest.skip("the detection site was the one killed in this run")
    metrics = RunState(scenario.state).read_metrics()
    trained = [r["sites"]["detection-lab"] for r in metrics if r["phase"] == "train"
               and "detection-lab" in r["sites"]]
    assert trained and all(s["status"] == "accepted" and s["dp"] == 1 for s in trained)
    evaluated = [r["sites"]["detection-lab"] for r in metrics if r["phase"] == "evaluate"
                 and "detection-lab" in r["sites"]]
    assert evaluated and all(0 <= s["map50"] <= 1 and "accuracy" not in s for s in evaluated)
    state = scenario.root / "state" / "detection-lab"
    assert (state / "detection_head.pt").exists()  # the head stays at the site
    assert len(read_ledger(state / LEDGER_FILE).rounds) == len(trained)


def test_each_round_is_one_message_per_site_and_sites_time_their_start_up(
        scenario: Scenario) -> None:
    metrics = RunState(scenario.state).read_metrics()
    # The encoders of rounds 1 and 2 were scored in the next rounds' train replies (round
    # 2's after the server's restart); only the last round had its own evaluate messages.
    evaluated = {r["round"]: r for r in metrics if r["phase"] == "evaluate"}
    assert evaluated[1]["with_train"] == 2 and evaluated[2]["with_train"] == 3
    assert "with_train" not in evaluated[3]
    assert all(0 <= s["accuracy"] <= 1 for n, s in evaluated[2]["sites"].items()
               if n != "detection-lab")
    for name in scenario.notes["survivors"]:  # type: ignore[attr-defined]
        times = [json.loads(line) for line in
                 (scenario.root / "state" / name / "message_times.jsonl").read_text().splitlines()]
        kinds = [(t["type"], t["round"]) for t in times]
        assert ("evaluate", 3) in kinds and ("evaluate", 1) not in kinds, kinds
        assert [k for k in kinds if k[0] == "evaluate"] == [("evaluate", 3)]
        for line in times:  # start-up measured from the process's own start, at the site
            assert 0 < line["spawn_to_handler_s"] <= line["spawn_to_ready_s"]
            assert line["task_to_ready_s"] is not None and line["compute_s"] > 0
        # runtime.prestart_runner (default): later messages found their process started
        # (and its libraries loaded) well before their task came.
        assert any(t["spawn_to_ready_s"] - t["task_to_ready_s"] > 2 for t in times[1:])
