"""The server's grid sees replies promptly, without hammering the SuperLink.

Flower's own HTTP grid sleeps 3 s between reply polls; the deployment e2e test
(tests/test_deployment.py) runs the wrapper against a real SuperLink. Here a grid
that answers after a set delay times the polls exactly.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from server.prompt_grid import LONGEST_POLL_S, PromptGrid, poll_intervals


class DelayedGrid:
    """Answers each pushed message ``delay`` seconds after the push; counts pulls."""

    def __init__(self, delay: float) -> None:
        self.delay, self.pulls, self.pushed_at = delay, 0, 0.0

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: Any) -> list[Any]:
        self.pulls += 1
        if time.monotonic() - self.pushed_at < self.delay:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]


@pytest.mark.parametrize("delay", [0.3, 4.0])
def test_replies_are_seen_within_a_second_at_about_a_pull_a_second(delay: float) -> None:
    inner = DelayedGrid(delay)
    grid = PromptGrid(inner)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive([object(), object()], timeout=60))
    waited = time.monotonic() - inner.pushed_at
    assert len(replies) == 2
    # Flower's grid would have answered at the next multiple of 3 s (3 s, then 6 s).
    assert delay <= waited <= delay + (0.2 if delay < 1 else LONGEST_POLL_S + 0.1)
    assert inner.pulls <= 6 + delay / LONGEST_POLL_S  # a few quick polls, then one a second


def test_the_timeout_still_ends_the_wait() -> None:
    inner = DelayedGrid(delay=60)
    started = time.monotonic()
    assert list(PromptGrid(inner).send_and_receive([object()], timeout=1.5)) == []  # type: ignore[arg-type]
    assert 1.5 <= time.monotonic() - started < 1.8


def test_poll_intervals_grow_to_the_cap() -> None:
    intervals = poll_intervals()
    first = [next(intervals) for _ in range(12)]
    assert first[0] == pytest.approx(0.1) and first == sorted(first)
    assert max(first) == LONGEST_POLL_S
