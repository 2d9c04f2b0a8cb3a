"""A hospital's SuperNode: checks that catch the usual mistakes, then Flower's SuperNode.

Before starting, ``medmeta site start`` checks what an engineer most often gets wrong,
each with a message that says what to do: the data path, the state directory, the CA
certificate and private key files, whether the SuperLink can be reached at all, and
whether its TLS certificate is signed by the consortium CA. While running, a refusal
by the SuperLink (an unregistered key) is turned into a clear message too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

from client.app_launcher import TaskLauncher, die_with_parent, write_launcher_secret
from medmeta_common.config.deploy import SiteDeployConfig
from medmeta_common.errors import DataError, FederationError

log = logging.getLogger("medmeta.site")

UNREGISTERED_MARKERS = ("code: 2004", "Failed to activate SuperNode")


def preflight(config: SiteDeployConfig) -> None:
    """Check the site's files and its connection to the SuperLink; raise a clear error."""
    from medmeta_common.data.sources import detect_format

    if config.task == "segmentation":
        from medmeta_common.data.segmentation import find_pairs

        folder = Path(config.data.path)
        if not (folder / config.data.manifest).is_file() and not find_pairs(folder):
            raise DataError(config.data.path, "no image/mask pairs found for this "
                            "segmentation site (see docs/data.md, segmentation layouts)")
    elif config.task == "detection":
        from medmeta_common.data.box_annotations import detect_detection_format

        detect_detection_format(Path(config.data.path), config.data.manifest)
    elif not config.data.is_builtin:
        detect_format(Path(config.data.path), config.data.manifest)
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if not os.access(state, os.W_OK):
        raise FederationError(f"{state}: the state directory is not writable")
    if not config.insecure:
        for label, path in (("CA certificate", config.root_certificate),
                            ("private key", config.private_key)):
            if path is None or not Path(path).is_file():
                raise FederationError(f"{path}: {label} not found")
        key_mode = Path(config.private_key or "").stat().st_mode
        if key_mode & 0o077:
            log.warning("%s is readable by other users; `chmod 600` it", config.private_key)
    host, _, port = config.superlink.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            if not config.insecure:
                context = ssl.create_default_context(cafile=config.root_certificate)
                with context.wrap_socket(raw, server_hostname=host):
                    pass
    except ssl.SSLCertVerificationError as exc:
        raise FederationError(
            f"the SuperLink at {config.superlink} presented a certificate that the CA in "
            f"{config.root_certificate} does not vouch for ({exc.verify_message}). Use the "
            "consortium's ca.crt from the operator, and the host name the server certificate "
            "was made for") from None
    except ssl.SSLError as exc:
        raise FederationError(f"TLS with the SuperLink at {config.superlink} failed ({exc}); "
                              "is it running with TLS?") from None
    except OSError as exc:
        raise FederationError(f"cannot reach the SuperLink at {config.superlink} "
                              f"({exc.strerror or exc}); check the address, that it is running, "
                              "and the firewall") from None


def supernode_command(config: SiteDeployConfig, config_path: Path,
                      launcher_secret: Path | None = None) -> list[str]:
    """The ``flower-supernode`` command line for this site.

    ``--isolation process``: the SuperNode starts no ClientApp itself; the site's own
    launcher claims each task (authenticated by ``launcher_secret``) and runs the app
    only as its ``app`` policy allows (:mod:`client.app_launcher`).
    """
    command = ["flower-supernode", "--superlink", config.superlink, "--port", str(config.port),
               "--node-config", f"site-config='{config_path.resolve()}'",
               "--isolation", "process"]
    if launcher_secret is not None:
        command += ["--superexec-auth-secret-file", str(launcher_secret)]
    if config.insecure:
        return [*command, "--insecure"]
    return [*command, "--root-certificates", str(config.root_certificate),
            "--auth-supernode-private-key", str(config.private_key)]


def run_supernode(config: SiteDeployConfig, config_path: Path) -> int:
    """Run the SuperNode in the foreground, relaying its log; return its exit code.

    The SuperNode runs in its own process group: when it exits (or this command is
    stopped) the whole group goes, including the helper processes Flower starts, which
    would otherwise keep retrying in the background.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(Path(config.state_dir) / "flwr_home")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    secret = write_launcher_secret(Path(config.state_dir))
    process = subprocess.Popen(supernode_command(config, config_path, secret), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, preexec_fn=die_with_parent)
    launcher = TaskLauncher(runtime_address=f"127.0.0.1:{config.port}", site_config=config_path,
                            secret=secret.read_bytes(), env=env,
                            prestart=config.runtime.prestart_runner)
    launcher.start()
    refused = threading.Event()

    def relay() -> None:
        assert process.stdout is not None
        for line in process.stdout:  # Flower's lines carry no time; ours do: add it
            sys.stderr.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line)
            if any(marker in line for marker in UNREGISTERED_MARKERS):
                refused.set()

    def stop_group(*_: object) -> None:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGTERM)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    previous = signal.signal(signal.SIGTERM, stop_group)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        stop_group()
        code = process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        launcher.stop()
        stop_group()
        reader.join(timeout=5)
    if refused.is_set():
        raise FederationError(
            f"the SuperLink refused site {config.name}: its key is not registered (or a "
            "SuperNode with this key is already connected elsewhere). Send "
            f"{config.public_key} to the operator, who adds it under `sites:` in server.yaml "
            "(or registers it with `flwr supernode register`); `medmeta site check` tells "
            "which problem it is")
    return code
