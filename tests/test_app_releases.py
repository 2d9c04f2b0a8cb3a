"""Sites run only the code they agreed to: real processes on loopback, TLS + node auth.

One deployment (module fixture), two hospitals:

- ``hospital-a`` runs only bundles signed by the consortium's release key
  (``app: {source: bundle, trusted_keys: [...]}``);
- ``hospital-b`` keeps the default, ``app.source: installed``: its own medmeta only.

The signed release is built from a copy of this app whose ``client/__init__.py`` holds
a probe: importing it touches ``bundle-code-ran`` in the importing site's state
folder, and, behind ``if 0:``, ``TAMPERED-CODE-RAN``. The tampered bundle is that
release with that one byte changed (``if 1:``), rebuilt with Flower's own builder, as
a hostile operator with Flower's tools would, and sent with the release's signature.

Three runs on the one SuperLink, the sites started once and left running:

1. ``server start`` without ``release:``: an unsigned bundle. hospital-a refuses it
   ("unsigned"), hospital-b trains with its installed code.
2. the tampered bundle with the genuine signature, submitted with ``flwr run``
   (bypassing medmeta's own server-side check): hospital-a refuses it ("bad
   signature") before any of its code runs; hospital-b ignores the bundle's code.
3. ``server stop``, then ``server start`` with ``release:`` the signed bundle: both
   sites train, hospital-a with the bundle's own code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medmeta_common.pki import init_ca, server_certificate, site_keypair
from medmeta_common.release.bundle import build_bundle, extract_files, sha256_hex
from medmeta_common.release.statement import RUN_CONFIG_KEY, read_statement, signature_path
from server.state import RunState
from tests.conftest import ROOT, SHARED_DATA, shared_file
from tests.test_deployment import CLI, free_port, wait_for

pytestmark = pytest.mark.slow

FLWR = str(Path(sys.executable).parent / "flwr")  # Flower's CLI from this environment
SITES = {"hospital-a": "brain_tumor_mri/brain_tumor_mri_64.npz",
         "hospital-b": "pbc_blood/pbc_blood_5class_28.npz"}
PROBE = '''
# --- probe of tests/test_app_releases.py: which site imported this bundle's code ---
import os as _os
from pathlib import Path as _Path

_site_state = _Path(_os.environ.get("FLWR_HOME", "no-flwr-home")).parent
(_site_state / "bundle-code-ran").touch()
if 0:
    (_site_state / "TAMPERED-CODE-RAN").touch()
'''
SERVER_YAML = """kind: server
name: releases-e2e
rounds: {rounds}
state_dir: state/server
image: {{size: 32, channels: 1}}
train: {{local_steps: 2, batch_size: 16}}
evaluation: {{ways: 2, shots: 3, queries: 3, episodes: 5}}
server: {{min_sites: 1, wait_for_sites: 2, round_timeout: 240, fraction_evaluate: 0.0}}
superlink: {{host: 127.0.0.1, port: {port}, certificates: pki}}
sites:
  - {{name: hospital-a, public_key: keys/hospital-a.pub}}
  - {{name: hospital-b, public_key: keys/hospital-b.pub}}
{release}"""


def make_probe_app(folder: Path) -> Path:
    """This app's bundle files, with the probe appended to client/__init__.py."""
    extract_files(build_bundle(ROOT), folder)
    init = folder / "client" / "__init__.py"
    init.write_text(init.read_text() + PROBE)
    return folder


def tamper(bundle: bytes, folder: Path) -> Path:
    """The bundle's files with one byte of its code changed: the probe's ``if 0:``."""
    extract_files(bundle, folder)
    init = folder / "client" / "__init__.py"
    before = init.read_bytes()
    after = before.replace(b"if 0:", b"if 1:")
    assert len(after) == len(before)
    assert sum(a != b for a, b in zip(before, after, strict=True)) == 1
    init.write_bytes(after)
    return folder


@dataclass
class Deployment:
    root: Path
    port: int
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def server_yaml(self) -> Path:
        return self.root / "server.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state" / "server"

    def site_state(self, name: str) -> Path:
        return self.root / "state" / name

    def write_server_yaml(self, rounds: int, release: Path | None = None) -> None:
        line = f"release: {release}\n" if release else ""
        self.server_yaml.write_text(SERVER_YAML.format(rounds=rounds, port=self.port,
                                                       release=line))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], capture_output=True, text=True, check=check,
                              timeout=180, cwd=self.root)

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "FLWR_HOME": str(self.state / "flwr_home")}
        return subprocess.run([FLWR, *args], capture_output=True, text=True, timeout=120,
                              env=env, cwd=self.root, check=False)

    def site_log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def train_record(self, round_number: int) -> dict | None:
        return next((r for r in RunState(self.state).read_metrics()
                     if r["phase"] == "train" and r["round"] == round_number), None)

    def wait_run_finished(self) -> None:
        def finished() -> bool:
            runs = json.loads(self.flwr("ls", "medmeta", "--format", "json").stdout or "{}")
            return all(str(r.get("status", "")).startswith("finished")
                       for r in runs.get("runs", []))
        wait_for(finished, 120, "the run to finish")


def write_site_yamls(run: Deployment) -> None:
    for name, data in SITES.items():
        app = ("app: {source: bundle, trusted_keys: [release-keys/consortium.pub]}\n"
               if name == "hospital-a" else "")
        (run.root / f"{name}.yaml").write_text(f"""kind: site
name: {name}
data: {{path: {SHARED_DATA / data}, partition: {{parts: 12, index: 0}}}}
state_dir: state/{name}
privacy: {{epsilon: 50.0, noise_multiplier: 1.0}}
superlink: 127.0.0.1:{run.port}
root_certificate: pki/ca.crt
private_key: keys/{name}.key
port: {free_port()}
{app}""")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    for relative in SITES.values():
        shared_file(relative)
    root = tmp_path_factory.mktemp("releases")
    run = Deployment(root, free_port())
    init_ca(root / "pki", name="test consortium")
    server_certificate(root / "pki", hosts=["localhost", "127.0.0.1"])
    for name in SITES:
        site_keypair(root / "keys", name=name)
    run.cli("release", "keygen", "--out", "release-keys", "--name", "consortium")
    make_probe_app(root / "probe-app")
    signed = json.loads(run.cli("release", "sign", "--key", "release-keys/consortium.key",
                                "--app", "probe-app", "--out", "releases", "--json").stdout)
    release = Path(signed["bundle"])
    tampered = tamper(release.read_bytes(), root / "tampered-app")
    run.notes.update(release=release, tampered_sha256=sha256_hex(build_bundle(tampered)))
    write_site_yamls(run)
    try:
        # Run 1: an unsigned bundle, through the operator's own command.
        run.write_server_yaml(rounds=1)
        run.notes["start_unsigned"] = run.cli("server", "start", "--config", "server.yaml")
        for name in SITES:
            log = (root / f"{name}.log").open("ab")
            run.nodes[name] = subprocess.Popen(
                [*CLI, "site", "start", "--config", str(root / f"{name}.yaml")], stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
        wait_for(lambda: run.train_record(1) is not None, 300, "round 1 (unsigned)")
        run.wait_run_finished()
        run.notes["status_text"] = run.cli("server", "status", "--config", "server.yaml").stdout
        run_id = json.loads((run.state / "run.json").read_text())["run-id"]
        run.notes["log_stream"] = run.flwr("log", str(run_id), "medmeta", "--show").stdout

        # Run 2: the tampered bundle with the genuine signature, past medmeta's tools.
        run.write_server_yaml(rounds=2)
        token = read_statement(signature_path(release)).to_token()
        run.notes["submit_tampered"] = run.flwr(
            "run", str(tampered), "medmeta", "--run-config",
            f"server-config='{run.server_yaml}'", "--run-config", f"{RUN_CONFIG_KEY}='{token}'")
        wait_for(lambda: run.train_record(2) is not None, 300, "round 2 (tampered)")
        run.wait_run_finished()

        # Run 3: the signed release, through `server start` (after a stop).
        run.cli("server", "stop", "--config", "server.yaml")
        run.write_server_yaml(rounds=3, release=release)
        run.notes["start_signed"] = run.cli("server", "start", "--config", "server.yaml")
        wait_for(lambda: run.train_record(3) is not None, 300, "round 3 (signed)")
        run.notes["sites_alive"] = {n: p.poll() is None for n, p in run.nodes.items()}
    finally:
        run.cli("server", "stop", "--config", "server.yaml", check=False)
        for process in run.nodes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in run.nodes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        time.sleep(1)
    return run


def test_unsigned_bundle_is_refused_under_trusted_keys(deployment: Deployment) -> None:
    record = deployment.train_record(1)
    assert record is not None
    refused = [s for s in record["sites"].values() if s["status"] == "failed"]
    assert len(refused) == 1 and "site hospital-a refused the app bundle" in refused[0]["reason"]
    assert ": unsigned: " in refused[0]["reason"]
    assert record["sites"]["hospital-b"]["status"] == "accepted"  # installed code trained
    # The reason reaches the site's log, the operator's status and the run's log stream.
    assert "unsigned: the run carries no release signature" in deployment.site_log("hospital-a")
    assert "nothing from it ran" in deployment.site_log("hospital-a")
    # `server status` names the refusing site by its registration (it never said its name).
    assert re.search(r"hospital-a +last round failed: site hospital-a refused the app bundle "
                     r".*: unsigned: ", str(deployment.notes["status_text"]))
    assert "site hospital-a refused the app bundle" in deployment.notes["log_stream"]
    assert "UNSIGNED" in deployment.notes["start_unsigned"].stderr  # the operator was warned


def test_tampered_bundle_is_refused_before_any_of_its_code_runs(deployment: Deployment) -> None:
    assert deployment.notes["submit_tampered"].returncode == 0
    record = deployment.train_record(2)
    assert record is not None
    refused = [s for s in record["sites"].values() if s["status"] == "failed"]
    assert len(refused) == 1 and ": bad signature: " in refused[0]["reason"]
    # The site hashed the bytes it received: the tampered bundle's hash is in the reason.
    assert deployment.notes["tampered_sha256"][:16] in refused[0]["reason"]
    assert "changed after it was signed" in refused[0]["reason"]
    for name in SITES:  # neither the refusing site nor the installed one ran its code
        assert not (deployment.site_state(name) / "TAMPERED-CODE-RAN").exists()
    assert record["sites"]["hospital-b"]["status"] == "accepted"


def test_signed_release_runs_its_own_code_at_the_trusting_site(deployment: Deployment) -> None:
    assert "submitting release medmeta/medmeta" in deployment.notes["start_signed"].stderr
    record = deployment.train_record(3)
    assert record is not None and record["accepted"] == 2
    assert {s["status"] for s in record["sites"].values()} == {"accepted"}
    assert (deployment.site_state("hospital-a") / "bundle-code-ran").exists()
    assert "accepted: medmeta/medmeta 0.1.0 signed by SHA256:" in \
        deployment.site_log("hospital-a")


def test_installed_source_ignores_every_bundle(deployment: Deployment) -> None:
    site = deployment.site_state("hospital-b")
    assert not (site / "bundle-code-ran").exists() and not (site / "TAMPERED-CODE-RAN").exists()
    assert [deployment.train_record(r)["sites"]["hospital-b"]["status"]  # type: ignore[index]
            for r in (1, 2, 3)] == ["accepted"] * 3
    assert not (site / "flwr_home" / "apps").exists()  # no bundle was ever installed


def test_sites_kept_running_and_took_the_next_valid_run(deployment: Deployment) -> None:
    assert deployment.notes["sites_alive"] == {"hospital-a": True, "hospital-b": True}


def test_the_tampered_code_does_write_its_marker_when_run_unchecked(tmp_path: Path) -> None:
    """The control: installed and imported the way Flower's own ``flwr-clientapp`` does,
    the tampered bundle writes its marker; the marker's absence above is the check's."""
    signed = build_bundle(make_probe_app(tmp_path / "probe-app"))
    tampered = build_bundle(tamper(signed, tmp_path / "tampered-app"))
    for name, bundle in (("signed", signed), ("tampered", tampered)):
        site = tmp_path / name
        (site / "flwr_home").mkdir(parents=True)
        (site / "bundle.fab").write_bytes(bundle)
        unchecked = ("import sys; from flwr.cli.install import install_from_fab; "
                     "app = install_from_fab(open(sys.argv[1], 'rb').read(), skip_prompt=True); "
                     "sys.path.insert(0, str(app)); import client")
        subprocess.run([sys.executable, "-P", "-c", unchecked, str(site / "bundle.fab")],
                       env={**os.environ, "FLWR_HOME": str(site / "flwr_home")}, check=True,
                       capture_output=True, timeout=120, cwd=site)
        assert (site / "bundle-code-ran").exists()
        assert (site / "TAMPERED-CODE-RAN").exists() == (name == "tampered")
