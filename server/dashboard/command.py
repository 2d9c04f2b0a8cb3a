"""``medmeta server dashboard``: serve the read-only dashboard of a run until interrupted."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

log = logging.getLogger("medmeta")

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def add_dashboard_command(operator_commands: Commands) -> None:
    """Add ``server dashboard`` to the operator's ``server`` command group."""
    dashboard = operator_commands.add_parser(
        "dashboard", help="a read-only web page of the run (rounds, sites, epsilon, curves)",
        description="Serve a read-only web page of the run in a state directory (the "
        "operator's state_dir, or a `medmeta simulate --out` directory): rounds done and "
        "in progress, the sites with their last report, accepted and rejected updates with "
        "the reasons, epsilon per site against its budget, learning curves and the config "
        "hash. It listens on 127.0.0.1 only, unless --host names another address and a "
        "token is given.")
    where = dashboard.add_mutually_exclusive_group(required=True)
    where.add_argument("--state", type=Path, help="the run's state directory")
    where.add_argument("--config", type=Path, help="server.yaml (its state_dir)")
    dashboard.add_argument("--port", type=int, default=8050, help="TCP port (default 8050)")
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default 127.0.0.1; any other needs "
                           "--token)")
    dashboard.add_argument("--token", default=os.environ.get("MEDMETA_DASHBOARD_TOKEN"),
                           help="access token every request must carry (default: "
                           "$MEDMETA_DASHBOARD_TOKEN); required with a non-local --host")
    dashboard.add_argument("--refresh", type=int, default=10,
                           help="seconds between page refreshes (default 10)")
    dashboard.set_defaults(handler=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C (or SIGTERM)."""
    from medmeta_common.errors import ConfigError
    from server.dashboard.serve import dashboard_server

    rounds = None
    state: Path = args.state
    if args.config is not None:
        from medmeta_common.config.deploy import load_server_config

        config = load_server_config(args.config)
        state, rounds = Path(config.state_dir), config.rounds
    if not state.is_dir():
        raise ConfigError(source="--state", field="state", expected="a run's state directory",
                          found=f"{state} (no such folder)")
    server = dashboard_server(state, host=args.host, port=args.port, token=args.token,
                              rounds_planned=rounds, refresh=max(2, args.refresh))
    host, port = str(server.server_address[0]), int(server.server_address[1])
    suffix = "/?token=<your token>" if args.token else "/"
    print(f"Dashboard of {state}: http://{host}:{port}{suffix} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
