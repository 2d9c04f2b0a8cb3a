"""What a run looks like now, read from its state directory (for ``server status``, the dashboard).

Everything comes from the files the server writes (``metrics.jsonl``, ``progress.json``,
``sites.json``, the checkpoints' names): the view works while the run goes on, after
it ended, and for a simulated run's directory alike, and it never changes a file.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.round_outcome import site_reason
from server.state import REGISTERED_SITES_FILE, RunState


def duration(seconds: float | None) -> str:
    """``42 s``, ``3 min``, ``2.5 h`` (``?`` when unknown)."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class SiteView:
    """One site as the server has seen it."""

    name: str
    status: str = "not seen"
    reason: str | None = None
    last_round: int | None = None
    last_contact: float | None = None
    epsilon: float | None = None
    epsilon_budget: float | None = None
    epsilon_round: int | None = None
    accepted_rounds: int = 0
    registered: bool = False
    epsilon_stale: bool = False

    def age(self, now: float) -> float | None:
        """Seconds since the site last answered (``None``: unknown)."""
        return None if self.last_contact is None else max(0.0, now - self.last_contact)



@dataclass
class RunView:
    """A run's rounds, sites, privacy and learning curve."""

    state_dir: str
    status: str
    rounds_done: int
    rounds_planned: int | None
    config_hash: str | None
    current_round: int | None = None
    current_phase: str | None = None
    phase_started: float | None = None
    updated: float | None = None
    eta_seconds: float | None = None
    failure: str | None = None
    failed_attempts: int = 0
    sites: dict[str, SiteView] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    curve: dict[int, float] = field(default_factory=dict)
    site_curves: dict[str, dict[int, float]] = field(default_factory=dict)
    central_epsilon: float | None = None
    checkpoints: list[str] = field(default_factory=list)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """Plain data (site ages in seconds from ``now``)."""
        now = time.time() if now is None else now
        data = asdict(self)
        for name, site in self.sites.items():
            data["sites"][name]["age_seconds"] = site.age(now)
        data["curve"] = {str(k): v for k, v in self.curve.items()}
        data["site_curves"] = {s: {str(k): v for k, v in c.items()}
                               for s, c in self.site_curves.items()}
        return data


def _registered_names(state: RunState) -> dict[str, str]:
    """Registered site name -> Flower node id (``sites.json``)."""
    try:
        raw = json.loads((state.out_dir / REGISTERED_SITES_FILE).read_text())
        return {str(name): str(node) for name, node in raw.items()} \
            if isinstance(raw, dict) else {}
    except (OSError, ValueError):
        return {}


def _eta(train: list[dict[str, Any]], remaining: int) -> float | None:
    """Seconds left at the pace of the completed rounds (start to start, evaluation included)."""
    times = [float(r["time"]) for r in train if isinstance(r.get("time"), (int, float))]
    if remaining <= 0:
        return 0.0
    if len(times) >= 2:
        return (times[-1] - times[0]) / (len(times) - 1) * remaining
    seconds = [float(r["seconds"]) for r in train if isinstance(r.get("seconds"), (int, float))]
    return sum(seconds) / len(seconds) * remaining if seconds else None


def read_run(state_dir: Path, rounds_planned: int | None = None) -> RunView:
    """The view of the run in ``state_dir`` (``rounds_planned`` if the config says more)."""
    state = RunState(state_dir)
    records = state.read_metrics()
    progress = state.read_progress()
    train = [r for r in records if r.get("phase") == "train"]
    failed = [r for r in records if r.get("phase") == "failed"]
    planned = rounds_planned or progress.get("rounds_planned")
    done = int(train[-1]["round"]) if train else 0
    status = str(progress["status"]) if progress.get("status") else \
        "unknown" if train else "not started"
    view = RunView(state_dir=str(state_dir), status=status, updated=progress.get("updated"),
                   rounds_done=done, rounds_planned=planned,
                   config_hash=progress.get("config_hash"),
                   failed_attempts=len(failed),
                   checkpoints=[p.name for p in state.checkpoints()])
    if view.status == "running":
        view.current_round = progress.get("round")
        view.current_phase = progress.get("phase")
        view.phase_started = progress.get("phase_started")
        view.eta_seconds = _eta(train, int(planned or done) - done)
    elif view.status == "failed":
        view.failure = progress.get("reason")
    registered = _registered_names(state)
    for name in sorted(registered):
        view.sites[name] = SiteView(name=name, registered=True)
    # Records of older servers named a site that never said its name `node-<id>`.
    aliases = {f"node-{node}": name for name, node in registered.items()}
    for record in records:
        _add_record(view, _named(record, aliases))
    for site in view.sites.values():
        # Not reported since the last completed round: the site spent at least this much.
        site.epsilon_stale = site.epsilon_round is not None and site.epsilon_round < done
    central = [r["central_epsilon"] for r in train if "central_epsilon" in r]
    view.central_epsilon = central[-1] if central else None
    view.rounds = [_round_row(_named(r, aliases)) for r in records
                   if r.get("phase") in ("train", "failed")]
    return view


def _named(record: dict[str, Any], aliases: dict[str, str]) -> dict[str, Any]:
    sites = record.get("sites", {})
    if not any(name in aliases for name in sites):
        return record
    return {**record, "sites": {aliases.get(n, n): m for n, m in sites.items()}}


def _add_record(view: RunView, record: dict[str, Any]) -> None:
    phase, number = record.get("phase"), int(record.get("round", 0))
    when = record.get("time")
    if phase == "evaluate":
        if isinstance(record.get("accuracy_mean"), (int, float)):
            view.curve[number] = float(record["accuracy_mean"])
        for name, metrics in record.get("sites", {}).items():
            value = metrics.get("accuracy", metrics.get("dice", metrics.get("map50")))
            if isinstance(value, (int, float)):
                view.site_curves.setdefault(name, {})[number] = float(value)
        return
    for name, metrics in record.get("sites", {}).items():
        site = view.sites.setdefault(name, SiteView(name=name))
        site.last_round = number
        site.status = str(metrics.get("status"))
        site.reason = site_reason(metrics)
        if metrics.get("status") != "dropped" and isinstance(when, (int, float)):
            site.last_contact = float(when)
        if phase == "train" and metrics.get("status") == "accepted":
            site.accepted_rounds += 1
        if isinstance(metrics.get("epsilon"), (int, float)):
            site.epsilon, site.epsilon_round = float(metrics["epsilon"]), number
        if isinstance(metrics.get("epsilon-budget"), (int, float)):
            site.epsilon_budget = float(metrics["epsilon-budget"])


def _round_row(record: dict[str, Any]) -> dict[str, Any]:
    return {"round": record.get("round"), "phase": record.get("phase"),
            "attempt": record.get("attempt"), "accepted": record.get("accepted"),
            "reason": record.get("reason"), "time": record.get("time"),
            "seconds": record.get("seconds"),
            "sites": {name: {"status": m.get("status"), "reason": site_reason(m),
                             "epsilon": m.get("epsilon"), "update_norm": m.get("update_norm")}
                      for name, m in sorted(record.get("sites", {}).items())}}
