"""Progress bars for long work (rounds, few-shot episodes, benchmark runs), on a terminal only.

On an interactive terminal a `rich <https://rich.readthedocs.io>`_ bar shows how far a
loop is, how fast it goes and what is left; log lines print above it (our handlers
write to the *current* ``sys.stderr``, which the bar redirects). In CI, in log files,
under Flower and with ``MEDMETA_PROGRESS=0`` nothing is drawn: the per-round log lines
are the plain record. Bars nest (episodes inside a round): the inner one is a second
line of the same display and disappears when done.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

T = TypeVar("T")

_display: Progress | None = None


def bars_enabled() -> bool:
    """Whether to draw: stderr is a terminal and ``MEDMETA_PROGRESS`` is not ``0``."""
    if os.environ.get("MEDMETA_PROGRESS", "1") == "0" or os.environ.get("CI"):
        return False
    return sys.stderr.isatty()


class Bar:
    """One task of the display (or nothing, when bars are off)."""

    def __init__(self, display: Progress | None, task: TaskID | None) -> None:
        self._display, self._task = display, task

    def advance(self, steps: float = 1) -> None:
        """Move the bar on by ``steps``."""
        if self._display is not None and self._task is not None:
            self._display.advance(self._task, steps)


@contextmanager
def progress_bar(description: str, total: float | None, *, completed: int = 0
                 ) -> Iterator[Bar]:
    """A bar of ``total`` steps (``completed`` already done) while the block runs."""
    global _display
    if not bars_enabled():
        yield Bar(None, None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    outer = _display is None
    if outer:
        _display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            console=None, transient=False, redirect_stderr=True)
        _display.start()
    display = _display
    assert display is not None
    task = display.add_task(description, total=total, completed=completed)
    try:
        yield Bar(display, task)
    finally:
        if outer:
            display.stop()
            _display = None
        else:
            display.remove_task(task)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a bar (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(description, total) as bar:
        for item in items:
            yield item
            bar.advance()
