"""The consortium operator's commands: ``certs init``, ``certs server``, ``server``, ``release``.

``medmeta server start`` runs the aggregation server (a Flower SuperLink with TLS and
SuperNode authentication, the sites registered, the meta-learning run submitted);
``status`` and ``stop`` follow and end it. The hospital's commands are in
:mod:`client.cli`, the researcher's in :mod:`medmeta.commands`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medmeta_common.cli_output import print_written, warn_insecure
from server.dashboard.command import add_dashboard_command

log = logging.getLogger("medmeta")

if TYPE_CHECKING:
    from medmeta_common.config.deploy import ServerConfig

    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def register_pretrain(commands: Commands) -> None:
    """Add ``pretrain`` (the operator makes a data-free prior)."""
    from server.pretrain import PretrainSettings

    defaults = PretrainSettings()
    pretrain = commands.add_parser(
        "pretrain", help="make a data-free prior: the backbone trained on synthetic images",
        description="Pretrain EfficientNet-Lite0 on procedurally generated (dead-leaves) "
        "images, no real image involved, for consortia that may not use public weights. "
        "Write the weights to --out and print their SHA-256; give the file to every site "
        "(its priors folder) and name it in server.yaml as model.weights.")
    pretrain.add_argument("--synthetic", action="store_true", required=True,
                          help="train on synthetic images (the only source there is)")
    pretrain.add_argument("--out", type=Path, required=True, help="the weights file to write")
    pretrain.add_argument("--steps", type=int, default=defaults.steps,
                          help=f"optimiser steps (default {defaults.steps}; on 2 CPU cores "
                          "800 steps at --size 32 took 8.5 minutes, 64 px costs about 4x "
                          "per step)")
    pretrain.add_argument("--images", type=int, default=defaults.images,
                          help=f"synthetic images generated (default {defaults.images})")
    pretrain.add_argument("--classes", type=int, default=defaults.classes,
                          help=f"random image styles to tell apart (default {defaults.classes})")
    pretrain.add_argument("--size", type=int, default=defaults.size,
                          help=f"image side in pixels (default {defaults.size})")
    pretrain.add_argument("--batch-size", type=int, default=defaults.batch_size)
    pretrain.add_argument("--seed", type=int, default=defaults.seed)
    pretrain.add_argument("--force", action="store_true", help="replace an existing file")
    pretrain.set_defaults(handler=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    """Pretrain the synthetic prior and say how to use it."""
    from medmeta_common.errors import ConfigError
    from server.pretrain import PretrainSettings, pretrain

    if args.out.exists() and not args.force:
        raise ConfigError(source="--out", field="out", expected="a new file (or --force)",
                          found=f"{args.out} exists")
    for name in ("steps", "images", "classes", "size", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(source=f"--{name.replace('_', '-')}", field=name,
                              expected="at least 1", found=str(getattr(args, name)))
    settings = PretrainSettings(steps=args.steps, images=args.images, classes=args.classes,
                                size=args.size, batch_size=args.batch_size, seed=args.seed)
    sha = pretrain(settings, args.out)
    print(f"Synthetic prior written to {args.out} (SHA-256 {sha}).")
    print("  server.yaml: model: {backbone: efficientnet_lite0, weights: " + str(args.out) + "}")
    print("  every site: put the file in its priors folder (site.yaml priors:, or "
          "<state_dir>/priors/); sites find it by its SHA-256")
    return 0


def register(commands: Commands, certs_commands: Commands) -> None:
    """Add ``certs init``, ``certs server``, ``pretrain`` and the ``server`` command group."""
    register_pretrain(commands)
    init = certs_commands.add_parser("init", help="create the consortium CA (operator)")
    init.add_argument("--out", type=Path, required=True, help="the consortium PKI folder")
    init.add_argument("--name", default="consortium", help="organisation name in the CA")
    init.add_argument("--days", type=int, default=3650)
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(handler=run_certs_init)
    server = certs_commands.add_parser("server", help="a SuperLink TLS certificate (operator)")
    server.add_argument("--out", type=Path, required=True, help="the consortium PKI folder")
    server.add_argument("--host", action="append", required=True,
                        help="a DNS name or IP address sites use to reach the server "
                        "(repeat for each; include 127.0.0.1 when the SuperLink listens on "
                        "0.0.0.0, since `medmeta server` itself connects over loopback)")
    server.add_argument("--days", type=int, default=825)
    server.add_argument("--force", action="store_true", help="replace existing files")
    server.set_defaults(handler=run_certs_server)
    operator = commands.add_parser("server", help="run the aggregation server (operator)")
    operator_commands = operator.add_subparsers(dest="server_command", required=True)
    start = operator_commands.add_parser(
        "start", help="start the SuperLink, register the sites and launch the run",
        description="Start a Flower SuperLink (TLS and SuperNode authentication unless the "
        "config says insecure), register the sites' public keys, and submit the "
        "meta-learning run. A state directory with checkpoints is resumed.")
    start.add_argument("--config", type=Path, required=True, help="server.yaml")
    start.add_argument("--rounds", type=int, default=None,
                       help="run this many rounds instead of the config's (e.g. a short "
                       "walk-through); a finished run is extended to it")
    start.add_argument("--foreground", action="store_true",
                       help="stay attached until the SuperLink stops (for systemd, Docker)")
    start.set_defaults(handler=run_server_start)
    status = operator_commands.add_parser("status", help="rounds done, sites, metrics, epsilon")
    status.add_argument("--config", type=Path, required=True, help="server.yaml")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(handler=run_server_status)
    stop = operator_commands.add_parser("stop", help="stop the run and the SuperLink")
    stop.add_argument("--config", type=Path, required=True, help="server.yaml")
    stop.set_defaults(handler=run_server_stop)
    add_dashboard_command(operator_commands)
    register_release(commands)


def register_release(commands: Commands) -> None:
    """Add ``release keygen|sign|verify`` (the release manager's, see :mod:`server.release`)."""
    from server import release

    release.register(commands)

def run_certs_init(args: argparse.Namespace) -> int:
    """Create the consortium CA."""
    from medmeta_common.pki import init_ca

    written = init_ca(args.out, name=args.name, days=args.days, force=args.force)
    print("Consortium CA created.")
    print_written(written, "operator only; it signs the server certificate",
             "send ca.crt to every site")
    return 0


def run_certs_server(args: argparse.Namespace) -> int:
    """Create the SuperLink certificate."""
    from medmeta_common.pki import server_certificate

    written = server_certificate(args.out, hosts=args.host, days=args.days, force=args.force)
    print(f"SuperLink certificate for {', '.join(args.host)} created.")
    print_written(written, "the SuperLink's TLS key", "the SuperLink's certificate")
    return 0


def run_server_start(args: argparse.Namespace) -> int:
    """Start the SuperLink, register sites, submit the run."""
    from medmeta_common.config.deploy import load_server_config
    from server.superlink import SuperLink

    config = load_server_config(args.config)
    rounds = check_start_rounds(config, args.rounds)
    if config.superlink.insecure:
        warn_insecure("the SuperLink")
    link = SuperLink(config, args.config)
    process = link.start_process()
    log.info("SuperLink started (pid %d) on %s:%d; log: %s", process.pid, config.superlink.host,
             config.superlink.port, link.log_file)
    try:
        names = link.register_sites()
        log.info("registered sites: %s", ", ".join(names) or "(none)")
        run_id = link.start_run(rounds=args.rounds)
    except BaseException:
        link.stop()
        raise
    done = last_checkpoint_round(Path(config.state_dir))
    what = f"resumed after round {done} of {rounds}" if done else f"started: {rounds} rounds"
    print(f"Run {run_id} {what} of '{config.name}'. "
          f"Follow it with `medmeta server status --config {args.config}`.")
    if not args.foreground:
        return 0
    stopping = []

    def stop(*_: object) -> None:
        stopping.append(True)
        link.stop()

    signal.signal(signal.SIGTERM, stop)
    code = process.wait()
    return 0 if stopping else code  # a requested stop is a clean exit


def last_checkpoint_round(state_dir: Path) -> int:
    """The round of the newest checkpoint in ``state_dir`` (0: none)."""
    from server.state import RunState

    names = RunState(state_dir).checkpoints()
    return int(names[-1].stem.split("-")[1]) if names else 0


def check_start_rounds(config: ServerConfig, rounds: int | None) -> int:
    """The rounds to run; refuse a finished run, warn when budgets will not last."""
    from medmeta_common.errors import ConfigError, FederationError
    from server.budget_forecast import budget_warnings
    from server.state import RunState

    if rounds is not None and rounds < 1:
        raise ConfigError(source="--rounds", field="rounds", expected="at least 1",
                          found=str(rounds))
    planned = rounds or config.rounds
    done = last_checkpoint_round(Path(config.state_dir))
    if done >= planned:
        raise FederationError(
            f"the run in {config.state_dir} is already FINISHED: {done} of {planned} rounds "
            "done, nothing to start. Give --rounds N (more than "
            f"{done}) to extend it, or start a new run in another state_dir (deploy/README.md: "
            "resetting the walk-through)")
    if done:
        log.info("the state directory holds rounds 1-%d: the run resumes after round %d of %d",
                 done, done, planned)
    records = RunState(Path(config.state_dir)).read_metrics()
    for warning in budget_warnings(records, rounds_left=planned - done,
                                   local_steps=config.train.local_steps,
                                   spare_rounds=config.server.spare_rounds):
        log.warning("%s", warning)
    return planned


def server_status(config_path: Path) -> dict[str, Any]:
    """Rounds done, sites connected, last metrics and epsilon per site."""
    from medmeta_common.config.deploy import load_server_config
    from server.run_view import read_run
    from server.state import RunState
    from server.superlink import SuperLink

    config = load_server_config(config_path)
    link = SuperLink(config, config_path)
    state = RunState(Path(config.state_dir))
    records = state.read_metrics()
    view = read_run(state.out_dir, state.read_progress().get("rounds_planned") or config.rounds)
    train = [r for r in records if r.get("phase") == "train"]
    evaluate = [r for r in records if r.get("phase") == "evaluate"]
    epsilon: dict[str, float] = {}
    for record in train:
        for site, metrics in record.get("sites", {}).items():
            if isinstance(metrics.get("epsilon"), (int, float)):
                epsilon[site] = float(metrics["epsilon"])
    pid = link.pid()
    central = [r["central_epsilon"] for r in train if "central_epsilon" in r]
    status: dict[str, Any] = {
        "central_epsilon": central[-1] if central else None,
        "superlink": {"running": pid is not None, "pid": pid},
        "rounds_done": train[-1]["round"] if train else 0,
        "rounds_planned": view.rounds_planned,
        "last_accuracy": evaluate[-1].get("accuracy_mean") if evaluate else None,
        "epsilon": epsilon,
        "last_round_sites": train[-1]["sites"] if train else {},
        "view": view.to_json(),
    }
    if pid is not None:
        run_id = link.run_id()
        runs = {str(r.get("run-id")): r for r in link.runs()}
        status["run"] = {"id": run_id, "status": runs.get(str(run_id), {}).get("status")}
        names = {v: k for k, v in link.site_ids().items()}
        status["nodes"] = [{"id": n.get("node-id"), "site": names.get(str(n.get("node-id"))),
                            "status": n.get("status")} for n in link.nodes()]
    return status


def run_server_status(args: argparse.Namespace) -> int:
    """Print the server's status; exit non-zero when the run has failed."""
    from medmeta_common.errors import FederationError
    from server.status_text import format_status

    status = server_status(args.config)
    print(json.dumps(status, default=str) if args.json else "\n".join(format_status(status)))
    return FederationError.exit_code if status["view"]["status"] == "failed" else 0


def run_server_stop(args: argparse.Namespace) -> int:
    """Stop the run and the SuperLink."""
    from medmeta_common.config.deploy import load_server_config
    from server.superlink import SuperLink

    stopped = SuperLink(load_server_config(args.config), args.config).stop()
    print("SuperLink stopped." if stopped else "No SuperLink was running.")
    return 0
