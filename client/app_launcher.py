"""The site's task launcher: takes each ClientApp task from the SuperNode, starts a runner.

With ``--isolation process`` the SuperNode starts no ClientApp itself; it waits for an
executor to claim its tasks over its local Runtime API. Flower's own executor
(``flower-superexec``) would start ``flwr-clientapp``, which installs and imports the
run's bundle unchecked; this launcher starts :mod:`client.app_runner` instead, which
checks the bundle first. Claiming a task is authenticated with a shared secret that
only this launcher and the SuperNode hold (``--superexec-auth-secret-file``), so no
other local process can take the site's tasks.

The launcher runs as a thread of ``medmeta site start``; each runner is a fresh
Python process (``-P``: the working directory is never on its import path) that gets
the task's token on stdin and stops when ``site start`` does.

With ``runtime.prestart_runner`` (the default) the launcher keeps one runner started
ahead of its task: it is started while the site is idle (at start-up, and when the
previous runner ends), loads the site's heavy libraries, and waits for a token on
stdin. Each task still gets a fresh process that no other task has used; only the
process start and the library imports move off the round's critical path.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

from medmeta_common.checkpoint import atomic_write

log = logging.getLogger("medmeta.site")

POLL_SECONDS = 0.2  # a local request; a task waits 0.1 s on average
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
SECRET_FILE = "superexec.secret"


def die_with_parent() -> None:
    """In a child process: get SIGTERM when its parent dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def write_launcher_secret(state_dir: Path) -> Path:
    """A fresh random secret for this start, mode 0600, in the site's ``flwr_home``."""
    path = state_dir / "flwr_home" / SECRET_FILE
    token = secrets.token_hex(32).encode()
    atomic_write(path, lambda handle: handle.write(token))  # mkstemp files are 0600
    return path


class TaskLauncher:
    """Claim the SuperNode's ClientApp tasks and start one runner process per task.

    Parameters
    ----------
    runtime_address : str
        The SuperNode's Runtime API (``127.0.0.1:<port>`` from site.yaml).
    site_config : Path
        The site.yaml each runner reads its app policy from.
    secret : bytes
        The SuperNode's SuperExec authentication secret.
    env : dict
        Environment of the runners (the site's ``FLWR_HOME``, PATH).

    """

    def __init__(self, *, runtime_address: str, site_config: Path, secret: bytes,
                 env: dict[str, str], prestart: bool = True) -> None:
        self.prestart = prestart
        self.spare: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.runtime_address = runtime_address
        self.site_config = site_config.resolve()
        self.env = env
        self.stopping = threading.Event()
        self.runners: list[subprocess.Popen[bytes]] = []
        self.client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address, insecure=True, root_certificates=None,
            interceptors=[SuperExecAuthHttpInterceptor(master_secret=secret,
                                                       protected_methods={ACQUIRE_METHOD})])
        # No retry invoker: the loop retries itself and stays stoppable (Flower's invoker
        # retries forever, and answers a 401 by interrupting the whole process).
        self.thread = threading.Thread(target=self._loop, name="medmeta-launcher", daemon=True)

    def start(self) -> None:
        """Start claiming tasks in the background."""
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
        self.thread.start()

    def stop(self) -> None:
        """Stop claiming tasks and end the runners still going."""
        self.stopping.set()
        self.thread.join(timeout=10)
        with self.lock:
            if self.spare is not None:
                self.runners.append(self.spare)
                self.spare = None
        for runner in self.runners:
            if runner.poll() is None:
                runner.terminate()
        for runner in self.runners:
            with contextlib.suppress(subprocess.TimeoutExpired):
                runner.wait(timeout=10)
        self.client.close()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                response = self.client.AcquireTask(AcquireTaskRequest(
                    supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # noqa: BLE001 - the SuperNode may be starting or gone
                log.debug("the SuperNode's Runtime API does not answer yet: %s", exc)
                self.stopping.wait(1.0)
                continue
            if response.HasField("task") and response.token:
                try:
                    self.launch(response.token, response.task.run_id)
                except OSError as exc:  # the claimed task expires; Flower reports it failed
                    log.error("could not start a ClientApp runner for run %s: %s",
                              response.task.run_id, exc)
            self.runners = [r for r in self.runners if r.poll() is None]
            with self.lock:  # stop() must see any spare started here
                if self.prestart and not self.runners and self.spare is None \
                        and not self.stopping.is_set():
                    self.spare = self._start_runner()  # idle now: start the next one
            self.stopping.wait(POLL_SECONDS)

    def launch(self, token: str, run_id: int) -> None:
        """Hand one task to a runner (the started spare, or a new one) on its stdin."""
        runner, self.spare = self.spare, None
        if runner is None or runner.poll() is not None:
            runner = self._start_runner()
        log.debug("run %s: runner %d takes the task", run_id, runner.pid)
        assert runner.stdin is not None
        try:
            runner.stdin.write(token.encode() + b"\n")
            runner.stdin.close()
        except BrokenPipeError:  # the spare died while waiting: start the task afresh
            runner = self._start_runner()
            assert runner.stdin is not None
            runner.stdin.write(token.encode() + b"\n")
            runner.stdin.close()
        self.runners.append(runner)

    def _start_runner(self) -> subprocess.Popen[bytes]:
        """A fresh runner process, waiting for its task's token on stdin."""
        command = [sys.executable, "-P", "-m", "client.app_runner",
                   "--runtime-api-address", self.runtime_address,
                   "--site-config", str(self.site_config), "--parent-pid", str(os.getpid())]
        if self.prestart:
            command.append("--preload")
        return subprocess.Popen(command, env=self.env, stdin=subprocess.PIPE,
                                cwd=self.site_config.parent)
