"""What each message costs a site before its compute starts, measured and kept at the site.

A deployed site runs every Flower message in a fresh process (:mod:`client.app_runner`),
so each message pays its imports, model build and data reading before any compute.
:class:`MessageClock` times one message's phases:

- ``spawn_to_ready_s``: from the process's start (the kernel's record of it) to the
  handler *ready*: the ClientApp imported, the encoder built, the site's data read,
  and (train, under DP) the DP library loaded;
- ``task_to_ready_s``: from the moment the process was handed its task (a runner the
  launcher started ahead of time waits for one; for a cold start it is about the same);
  ``task_to_input_s`` of it is Flower's Runtime API pulling the task's input;
- ``compute_s``: the handler's work after *ready* (validation, local training).

One JSON line per message goes to ``<state_dir>/message_times.jsonl`` (a site-local
operations log: it is never sent; only ``compute-seconds`` is in the train reply).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TIMES_FILE = "message_times.jsonl"
# Set by the runner when its task arrives, and when it has pulled the task's message,
# run and bundle from the SuperNode (time.time(); None in other processes).
_task_received: float | None = None
_input_pulled: float | None = None


def mark_task_received() -> None:
    """The runner got its task's token: what comes after is this message's start-up."""
    global _task_received
    _task_received = time.time()


def mark_input_pulled() -> None:
    """The runner has the task's input (Flower's Runtime API calls are done)."""
    global _input_pulled
    _input_pulled = time.time()


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``; ``None`` elsewhere)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # Field 22 (start time, clock ticks after boot); the name in field 2 may
            # hold spaces, so count from the ")" that closes it.
            started = int(stat.read().rsplit(")", 1)[1].split()[19])
            now = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, now - started / os.sysconf("SC_CLK_TCK"))


@dataclass
class MessageClock:
    """The phases of one message at the site (see the module docstring)."""

    kind: str
    at_handler: float | None = field(default_factory=process_age)
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    ready_age: float | None = None
    task_to_ready: float | None = None

    def ready(self) -> None:
        """Everything the message needs is loaded; compute starts now."""
        self.ready_at = time.monotonic()
        self.ready_age = process_age()
        if _task_received is not None:
            self.task_to_ready = time.time() - _task_received

    @property
    def compute_seconds(self) -> float:
        """Seconds since :meth:`ready` (or since the handler began, if never ready)."""
        return time.monotonic() - (self.ready_at or self.started)

    def record(self, state_dir: Path, server_round: int) -> dict[str, float | int | str | None]:
        """Append this message's line to the site's ``message_times.jsonl``; return it."""
        line: dict[str, float | int | str | None] = {
            "time": round(time.time(), 3), "type": self.kind, "round": server_round,
            "spawn_to_handler_s": _rounded(self.at_handler),
            "spawn_to_ready_s": _rounded(self.ready_age),
            "task_to_ready_s": _rounded(self.task_to_ready),
            "task_to_input_s": _rounded(None if _input_pulled is None or _task_received is None
                                        else _input_pulled - _task_received),
            "compute_s": round(self.compute_seconds, 3)}
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            # One short O_APPEND write per message: lines never interleave.
            with open(state_dir / TIMES_FILE, "a") as handle:
                handle.write(json.dumps(line) + "\n")
        except OSError as exc:  # timing is advice; never fail a round over it
            log.warning("could not record message times in %s: %s", state_dir, exc)
        return line


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
