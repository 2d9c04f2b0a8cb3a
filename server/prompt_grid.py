"""Flower's deployment grid, answering as soon as the sites' replies are in.

Flower 1.42's HTTP grid (``flwr/superlink/grid/http_grid.py``) sleeps a fixed 3 s
between reply polls in ``send_and_receive``: a round whose last reply arrives just
after a poll waits up to 3 s more, once per phase. :class:`PromptGrid` wraps the grid
and does the same push-then-pull with a short first interval that grows (0.1 s, x1.5,
capped at 0.5 s): a reply is seen within ~0.1 s early in a round and 0.5 s later,
at no more than two pulls a second against the SuperLink in a long round.

The SuperNode's own 3 s poll for new messages (``flwr/supernode/start_client_internal.py``)
is Flower's and is not changed here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

FIRST_POLL_S = 0.1
POLL_GROWTH = 1.5
LONGEST_POLL_S = 0.5


def poll_intervals(first: float = FIRST_POLL_S, growth: float = POLL_GROWTH,
                   longest: float = LONGEST_POLL_S) -> Iterable[float]:
    """The pauses between reply polls: growing from ``first`` up to ``longest``."""
    wait = first
    while True:
        yield wait
        wait = min(longest, wait * growth)


class PromptGrid(Grid):
    """A grid that delegates to Flower's, with a prompter ``send_and_receive``."""

    def __init__(self, grid: Grid) -> None:
        self.inner = grid

    def set_run(self, run: Run) -> None:  # noqa: D102 - Flower's Grid API
        self.inner.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,  # noqa: D102
                       group_id: str, ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; pull replies until all are in or ``timeout`` s have passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        for pause in poll_intervals():
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting:
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                pause = min(pause, left)
            time.sleep(pause)
        return replies
