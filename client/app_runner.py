"""The site's ClientApp runner: judge the run's app bundle, then (maybe) run a ClientApp.

``medmeta site start`` runs Flower's SuperNode with ``--isolation process``, so the
SuperNode starts no ClientApp of its own; the site's launcher
(:mod:`client.app_launcher`) starts this runner in a fresh process for each task, in
place of Flower's ``flwr-clientapp``. The runner:

1. pulls the task's message, context, run and app bundle from the SuperNode (Flower's
   own Runtime API calls, as ``flwr-clientapp`` makes them, with a prompter retry of
   objects still in transit: :mod:`client.task_input`);
2. judges the bundle by site.yaml's ``app`` policy (:func:`client.app_policy.judge_bundle`)
   while the bundle is still only bytes in memory: nothing from it has been written to
   disk, put on ``sys.path`` or imported;
3. on a refusal, replies with an error that names the reason (the server logs it and
   records it for the site), marks the task failed and exits; the SuperNode runs on
   and takes the next run;
4. otherwise loads a ClientApp: with ``source: installed`` the site's own
   ``client.app`` (the bundle is never installed); with ``source: bundle`` the bundle,
   installed into a fresh private folder, with its packages shadowing the installed
   ones; and pushes the ClientApp's reply.

It is pinned to Flower 1.42's Runtime API (``flwr>=1.42,<1.43`` in pyproject.toml).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from client.app_launcher import die_with_parent
from client.app_policy import Verdict, judge_bundle
from client.startup import mark_input_pulled, mark_task_received
from client.task_input import pull_task_input
from medmeta_common.app_logging import quiet_third_party_warnings
from medmeta_common.config.app import AppPolicyConfig
from medmeta_common.release.bundle import bundle_metadata
from medmeta_common.release.statement import RUN_CONFIG_KEY

log = logging.getLogger("medmeta.site")


def refusal_reason(site: str, verdict: Verdict, bundle: bytes) -> str:
    """The error a refused run gets: the site, the reason, the bundle, what happened.

    Kept short: the server records the first 300 characters of a site's error.
    """
    try:
        app, version = bundle_metadata(bundle)
        what = f"{app} {version}, "
    except Exception:  # noqa: BLE001 - a refused bundle may be anything; name it by hash
        what = ""
    return (f"site {site} refused the app bundle ({what}sha256 {verdict.bundle_sha256[:16]}…): "
            f"{verdict.reason}: {verdict.detail}; nothing from it ran")


def run_signature(run_config: Mapping[str, object]) -> str:
    """The release signature the operator sent with the run ("" if none)."""
    value = run_config.get(RUN_CONFIG_KEY, "")
    return value if isinstance(value, str) else ""


def _shadowing_names(app_dir: Path) -> set[str]:
    """Top-level modules and packages of an installed bundle."""
    return {p.stem if p.is_file() else p.name for p in app_dir.iterdir()
            if (p.is_dir() and not p.name.startswith(".")) or p.suffix == ".py"}


def load_bundle_app(bundle: bytes, workdir: Path) -> ClientApp:
    """Install an accepted bundle into ``workdir`` and load its ClientApp from there.

    The runner itself was imported from the site's installation; the bundle ships the
    same package names, so those are dropped from ``sys.modules`` first and the bundle's
    folder put first on ``sys.path``: the bundle's own code runs, not the installed one.
    """
    from flwr.cli.install import install_from_fab
    from flwr.common.config import get_project_config
    from flwr.supercore.object_ref import load_app

    app_dir = install_from_fab(bundle, install_dir=workdir, skip_prompt=True)
    reference = str(get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
                    ["clientapp"])
    names = _shadowing_names(app_dir)
    for module in [m for m in sys.modules if m.split(".")[0] in names]:
        del sys.modules[module]
    app = load_app(reference, LoadClientAppError, app_dir)
    if not isinstance(app, ClientApp):
        raise LoadClientAppError(f"{reference} in the bundle is not a Flower ClientApp")
    return app


def load_installed_app() -> ClientApp:
    """The ClientApp of the medmeta installed at this site."""
    from client.app import app

    return app


def load_policy(site_config: Path) -> tuple[str, AppPolicyConfig]:
    """The site's name and app policy, read afresh from site.yaml for every task."""
    from medmeta_common.config.deploy import load_site_config

    config = load_site_config(site_config)
    return config.name, config.app


def _runtime_client(address: str, token: str) -> RuntimeHttpClient:
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


def load_app_for_run(site_config: Path, run_id: int, bundle: bytes, signature: str,
                     workdir: Path) -> ClientApp | str:
    """The ClientApp the site's policy allows for this run, or the reason it refuses."""
    try:
        site, policy = load_policy(site_config)
    except Exception as exc:  # noqa: BLE001 - a broken site.yaml refuses the run, named
        return f"the site cannot read its configuration {site_config}: {exc}"
    if policy.source == "installed":
        log.info("run %s: running the installed medmeta (app.source: installed); the run's "
                 "app bundle is ignored", run_id)
        return load_installed_app()
    verdict = judge_bundle(policy, bundle, signature)
    if not verdict.accepted:
        return refusal_reason(site, verdict, bundle)
    log.log(logging.WARNING if verdict.reason == "unverified" else logging.INFO,
            "run %s: app bundle sha256 %s… accepted: %s", run_id, verdict.bundle_sha256[:16],
            verdict.detail)
    return load_bundle_app(bundle, workdir)


def answer(message: Message, context: Context, app: ClientApp) -> tuple[Message, str]:
    """The ClientApp's reply, or an error reply naming its exception (as Flower makes it)."""
    try:
        return app(message=message, context=context), ""
    except Exception as exc:  # a failed round is answered, not dropped
        log.exception("the ClientApp raised an exception")
        reason = f"{type(exc)}:<'{exc}'>"
        return _error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reason


def run_task(address: str, token: str, site_config: Path) -> int:
    """Judge, then run (or refuse) one task; return the process exit code."""
    client = _runtime_client(address, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    outcome = {"status": SubStatus.FAILED, "details": "stopped at the site"}
    context: Context | None = None

    def finish() -> None:
        push_task_output(client=client, context=context, sub_status=outcome["status"],
                         details=outcome["details"])
        heartbeat.stop()
        client.close()

    def stopped(signum: int, _frame: object) -> None:
        # Record the task as stopped if the SuperNode still answers; it may be gone (the
        # site is stopping), and Flower's client retries forever: wait 5 s at most.
        recording = threading.Thread(target=finish, daemon=True)
        recording.start()
        recording.join(timeout=5)
        os._exit(128 + signum)  # skip the interrupted code's cleanup

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    workdir = Path(tempfile.mkdtemp(prefix="medmeta-bundle-"))
    try:
        message, context, run, fab = pull_task_input(client)
        mark_input_pulled()
        try:
            app = load_app_for_run(site_config, run.run_id, fab.content,
                                   run_signature(run.override_config), workdir)
        except Exception as exc:  # an accepted app that fails to load
            log.exception("the ClientApp could not be loaded")
            problem = f"site could not load the ClientApp: {type(exc).__name__}: {exc}"
            reply = _error_reply(message, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, problem)
        else:
            if isinstance(app, str):  # refused: the reason goes back to the server
                log.error("run %s: %s", run.run_id, app)
                reply, problem = _error_reply(message, ErrorCode.INVALID_FAB, app), app
            else:
                reply, problem = answer(message, context, app)
        push_message(client, reply, context)
        if problem:
            outcome["details"] = problem
            return 1
        outcome.update(status=SubStatus.COMPLETED, details="")
        return 0
    finally:
        finish()
        shutil.rmtree(workdir, ignore_errors=True)


def preload(site_config: Path) -> None:
    """Import what this site's messages need, before the task arrives.

    The installed libraries (torch; Opacus when the site trains under DP; MONAI for
    segmentation and detection sites) and, when the site runs its installed medmeta
    (``app.source: installed``), its ClientApp and task code. Nothing of a run's app
    bundle: that is judged after the task arrives (and replaces the installed
    modules). A site.yaml that cannot be read is left for the task to report.
    """
    import torch  # noqa: F401

    try:
        from medmeta_common.config.deploy import load_site_config

        config = load_site_config(site_config)
    except Exception:  # noqa: BLE001 - the task names the problem
        return
    if config.privacy.enabled:
        from medmeta_common.privacy.dp_sgd import load_dp_library

        load_dp_library()
    if config.task != "classification":
        import monai  # noqa: F401
    if config.app.source == "installed":
        from client.tasks import get_task

        load_installed_app()
        get_task(config.task)


def main(argv: list[str] | None = None) -> int:
    """``python -P -m client.app_runner``: the task token arrives on stdin."""
    parser = argparse.ArgumentParser(description="medmeta's ClientApp runner (started by "
                                     "`medmeta site start`, one process per task)")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--site-config", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--preload", action="store_true",
                        help="import the site's libraries before reading the task's token")
    args = parser.parse_args(argv)
    # A time on every line: the site's terminal shows one line per round (client.site_log).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s medmeta %(levelname)s: "
                        "%(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    quiet_third_party_warnings()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    # Flower's parent monitor raises SIGINT, and the launcher's parent-death signal is
    # SIGTERM: both must end a runner still waiting for its task, even when the site was
    # started with them ignored (a background shell job ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.parent_pid is not None:
        # A runner waiting for its task must not outlive the site, however the site dies.
        die_with_parent()
        if os.getppid() != args.parent_pid:  # it died before the line above
            return 1
        start_parent_process_monitor(args.parent_pid)
    if args.preload:
        preload(args.site_config)
    token = sys.stdin.readline().strip()
    mark_task_received()
    if not token:
        parser.error("no task token on stdin")
    return run_task(args.runtime_api_address, token, args.site_config)


if __name__ == "__main__":
    sys.exit(main())
