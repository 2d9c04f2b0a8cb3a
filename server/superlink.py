"""The operator's processes: the SuperLink, the sites' registration, the run.

A Flower SuperLink with TLS and SuperNode authentication, the registration of the
sites' keys, and the meta-learning run submitted to it.

Everything lives in the server's state directory: ``superlink.db`` (Flower's state,
including registered nodes), ``superlink.log``, ``superlink.pid``, ``run.json`` (the
current run) and ``flwr_home/`` (the connection settings of Flower's CLI), next to the
checkpoints and metrics the ServerApp writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medmeta_common.checkpoint import atomic_write_json, atomic_write_text
from medmeta_common.config.deploy import ServerConfig
from medmeta_common.errors import FederationError
from medmeta_common.pki import CA_CERT, SERVER_CERT, SERVER_KEY

log = logging.getLogger("medmeta.server")

CONNECTION = "medmeta"
APP_DIR = Path(__file__).resolve().parents[1]  # holds pyproject.toml's [tool.flwr.app]


def flower_env(state_dir: Path) -> dict[str, str]:
    """Environment for Flower's tools: our venv on PATH, private FLWR_HOME, no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(state_dir / "flwr_home")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def connect_host(config: ServerConfig) -> str:
    """Where local tools reach the SuperLink (loopback when it listens everywhere)."""
    host = config.superlink.host
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


class SuperLink:
    """Start, register, run, inspect and stop the operator's SuperLink."""

    def __init__(self, config: ServerConfig, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path.resolve()
        self.state = Path(config.state_dir)
        self.env = flower_env(self.state)
        self.pid_file = self.state / "superlink.pid"
        self.log_file = self.state / "superlink.log"

    # --- processes ----------------------------------------------------------------------

    def pid(self) -> int | None:
        """The running SuperLink's PID, if any (a reused PID of another program is not it)."""
        try:
            pid = int(self.pid_file.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"flower-superlink" in command else None

    def check_files(self) -> None:
        """Certificates and site keys must exist before anything starts."""
        missing = []
        link = self.config.superlink
        if not link.insecure:
            pki = Path(link.certificates or "")
            missing += [str(pki / f) for f in (CA_CERT, SERVER_CERT, SERVER_KEY)
                        if not (pki / f).is_file()]
        missing += [s.public_key for s in self.config.sites if not Path(s.public_key).is_file()]
        if missing:
            raise FederationError("missing file(s): " + ", ".join(missing) + " (make them with "
                                  "`medmeta certs ...`; each site sends its <name>.pub)")

    def superlink_command(self) -> list[str]:
        """The ``flower-superlink`` command line for this config."""
        link = self.config.superlink
        command = ["flower-superlink", "--host", link.host, "--port", str(link.port),
                   "--database", str(self.state / "superlink.db"),
                   "--disable-runtime-dependency-installation"]
        if link.insecure:
            return [*command, "--insecure"]
        pki = Path(link.certificates or "")
        return [*command, "--ssl-ca-certfile", str(pki / CA_CERT), "--ssl-certfile",
                str(pki / SERVER_CERT), "--ssl-keyfile", str(pki / SERVER_KEY),
                "--enable-supernode-auth"]

    def write_connection(self) -> None:
        """Flower CLI settings so `flwr` commands reach this SuperLink."""
        link = self.config.superlink
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{connect_host(self.config)}:{link.port}"']
        if link.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{Path(link.certificates or "") / CA_CERT}"')
        home = self.state / "flwr_home"
        home.mkdir(parents=True, exist_ok=True)
        atomic_write_text(home / "config.toml", "\n".join(lines) + "\n")

    def start_process(self) -> subprocess.Popen[bytes]:
        """Start the SuperLink in its own session, logging to ``superlink.log``."""
        if (pid := self.pid()) is not None:
            raise FederationError(f"a SuperLink is already running for {self.state} (pid {pid});"
                                  " see `medmeta server status` or `medmeta server stop`")
        self.check_files()
        self.state.mkdir(parents=True, exist_ok=True)
        self.write_connection()
        log_handle = self.log_file.open("ab")
        process = subprocess.Popen(self.superlink_command(), env=self.env, stdout=log_handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        atomic_write_text(self.pid_file, f"{process.pid}\n")
        self.wait_ready(process)
        return process

    def wait_ready(self, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
        """Wait until the SuperLink accepts connections (or fail with its log's tail)."""
        deadline = time.monotonic() + timeout
        address = (connect_host(self.config), self.config.superlink.port)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise FederationError(f"the SuperLink exited at start (code {process.returncode})"
                                      f"; last log lines:\n{self.log_tail()}")
            try:
                with socket.create_connection(address, timeout=1):
                    time.sleep(1.0)  # the port opens slightly before the API is served
                    return
            except OSError:
                time.sleep(0.5)
        raise FederationError(f"the SuperLink did not open {address[0]}:{address[1]} within "
                              f"{timeout:.0f} s; see {self.log_file}")

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the SuperLink log."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- Flower CLI -----------------------------------------------------------------------

    def flwr(self, *args: str, check: bool = True) -> dict[str, Any]:
        """Run a `flwr` command with JSON output and return it."""
        result = subprocess.run(["flwr", *args, "--format", "json"], env=self.env,
                                capture_output=True, text=True, check=False, cwd=APP_DIR)
        try:
            payload: dict[str, Any] = json.loads(result.stdout[result.stdout.find("{"):] or "{}")
        except json.JSONDecodeError:
            payload = {"success": False, "error-message": result.stdout + result.stderr}
        if check and not payload.get("success", False):
            raise FederationError(f"`flwr {' '.join(args)}` failed: "
                                  f"{payload.get('error-message') or result.stderr.strip()}")
        return payload

    def register_sites(self) -> list[str]:
        """Register every configured site's public key; already registered keys are kept.

        The node ID Flower gives each site is kept in ``sites.json`` (Flower's own
        listing shows IDs only), so status and key rotation can name sites.
        """
        registered = []
        known = self.site_ids()
        for site in self.config.sites:
            payload = self.flwr("supernode", "register", site.public_key, CONNECTION,
                                "--name", site.name, check=False)
            message = str(payload.get("error-message", ""))
            if payload.get("success"):
                known[site.name] = str(payload.get("node-id", known.get(site.name, "")))
            elif "already" not in message.lower():
                raise FederationError(f"could not register site {site.name} "
                                      f"({site.public_key}): {message}")
            registered.append(site.name)
        atomic_write_json(self.state / "sites.json", known)
        return registered

    def site_ids(self) -> dict[str, str]:
        """Site name -> Flower node ID, as recorded at registration."""
        try:
            return {str(k): str(v) for k, v in
                    json.loads((self.state / "sites.json").read_text()).items()}
        except (OSError, ValueError):
            return {}

    def start_run(self, rounds: int | None = None) -> str:
        """Submit the meta-learning run (our ServerApp) and remember its ID.

        A ``release:`` in server.yaml is submitted exactly as signed, with its
        signature in the run config (:mod:`server.release_run`); ``rounds`` overrides
        the config's (``medmeta server start --rounds N``).
        """
        from server.release_run import release_submission

        app_dir, entries = release_submission(self.config, self.state, APP_DIR)
        extra = [a for k, v in entries.items() for a in ("--run-config", f"{k}='{v}'")]
        if rounds is not None:
            extra += ["--run-config", f"rounds={int(rounds)}"]
        payload = self.flwr("run", str(app_dir), CONNECTION, "--run-config",
                            f"server-config='{self.config_path}'", *extra)
        run_id = str(payload.get("run-id"))
        atomic_write_json(self.state / "run.json", {"run-id": run_id,
                                                    "config": str(self.config_path),
                                                    "started": time.time()})
        return run_id

    def run_id(self) -> str | None:
        """The ID of the run this server started last."""
        try:
            return str(json.loads((self.state / "run.json").read_text())["run-id"])
        except (OSError, ValueError, KeyError):
            return None

    def runs(self) -> list[dict[str, Any]]:
        """Flower's view of the runs on this SuperLink."""
        return list(self.flwr("ls", CONNECTION).get("runs", []))

    def nodes(self) -> list[dict[str, Any]]:
        """Flower's view of the registered SuperNodes."""
        return list(self.flwr("supernode", "ls", CONNECTION).get("nodes", []))

    def stop(self) -> bool:
        """Stop the run and the SuperLink (and its ServerApp). True if something was stopped."""
        run_id = self.run_id()
        pid = self.pid()
        if pid is None:
            return False
        if run_id:
            self.flwr("stop", run_id, CONNECTION, check=False)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            if self.pid() is None:
                break
            time.sleep(0.2)
        else:
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True
