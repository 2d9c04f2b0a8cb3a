"""A grid whose waits end when the engine behind it is gone.

Flower's in-memory simulation grid waits for replies until the round timeout even if
the simulation runtime has crashed, which would leave the ServerApp thread (and the
``medmeta simulate`` process) hanging for an hour. This wrapper sends and polls with
Flower's own ``push_messages``/``pull_messages`` and stops waiting as soon as the
``abort`` event is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from medmeta_common.errors import FederationError


class AbortableGrid:
    """Delegates to ``grid``; ``send_and_receive`` gives up when ``abort`` is set."""

    def __init__(self, grid: Grid, abort: threading.Event, poll_interval: float = 0.1) -> None:
        self._grid = grid
        self._abort = abort
        self._poll_interval = poll_interval

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Push ``messages`` and collect replies until all arrive, timeout, or abort."""
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            if self._abort.is_set():
                raise FederationError("the federation engine stopped; abandoning the round")
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if pending:
                time.sleep(self._poll_interval)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
