"""A simulated federation in Flower's engine that keeps every reply the sites send."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation as flower_run_simulation

from client.app import make_client_app
from client.site import SiteRuntime
from medmeta.simulate import prepare_run_dir
from medmeta_common.config import FederationConfig
from server.app import run_federation


class RecordingGrid:
    """Passes everything to Flower's grid and keeps every reply a site sends."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.replies: list[Message] = []

    def pull_messages(self, message_ids: Any) -> list[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def simulate_recorded(config: FederationConfig, out: Path,
                      resolve: Callable[[Context], SiteRuntime]) -> list[Message]:
    """Run ``config`` into ``out`` with sites from ``resolve``; every reply the server got."""
    prepare_run_dir(config, out, resume=False)
    recorder: dict[str, RecordingGrid] = {}
    server_app = ServerApp()
    abort = threading.Event()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        recorder["grid"] = RecordingGrid(grid)
        run_federation(recorder["grid"], config, out, resume=False,  # type: ignore[arg-type]
                       abort=abort)

    try:
        flower_run_simulation(
            server_app=server_app,
            client_app=make_client_app(resolve),
            num_supernodes=len(config.sites),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": 2, "log_to_driver": False}},
        )
    finally:
        abort.set()
        import ray

        ray.shutdown()
    return recorder["grid"].replies
