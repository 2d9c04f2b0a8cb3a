"""``medmeta server status`` as text: the run, the round in progress, each named site."""

from __future__ import annotations

import time
from typing import Any

from server.run_view import duration


def _site_line(name: str, site: dict[str, Any], node: dict[str, Any] | None) -> str:
    age = site.get("age_seconds")
    report = "never" if age is None else f"{duration(age)} ago"
    last = site.get("reason") or site.get("status") or "not seen"
    where = "" if site.get("last_round") is None else f" (round {site['last_round']})"
    spent = "-" if site.get("epsilon") is None else f"{site['epsilon']:.3f}"
    budget = "?" if site.get("epsilon_budget") is None else f"{site['epsilon_budget']:g}"
    epsilon = f"epsilon {spent} of {budget}"
    if site.get("epsilon_stale"):
        epsilon += f" (stale: reported in round {site['epsilon_round']})"
    link = f"{node['status']}, " if node else ""
    return f"  {name:<20} last round {last}{where}; {link}last report {report}; {epsilon}"


def format_status(status: dict[str, Any], now: float | None = None) -> list[str]:
    """Lines for a terminal, from :func:`server.cli.server_status`'s result."""
    now = time.time() if now is None else now
    view = status["view"]
    link = status["superlink"]
    lines = ["SuperLink: " + (f"running (pid {link['pid']})" if link["running"] else "stopped")]
    if "run" in status:
        lines.append(f"Flower run: {status['run']['id']} {status['run']['status']}")
    lines.append(f"run: {view['status']}, {view['rounds_done']}/{view['rounds_planned']} rounds "
                 f"done (config hash {view['config_hash'] or '?'})")
    if view.get("current_round") is not None:
        started = view.get("phase_started")
        lines.append(f"in progress: round {view['current_round']}, {view['current_phase']} "
                     f"(for {duration(now - started if started else None)}); about "
                     f"{duration(view.get('eta_seconds'))} left")
    if view.get("failure"):
        lines.append(f"FAILED: {view['failure']}")
    if view.get("failed_attempts"):
        lines.append(f"failed round attempts so far: {view['failed_attempts']}")
    nodes = {n["site"]: n for n in status.get("nodes", []) if n.get("site")}
    if nodes:
        online = sum(n["status"] == "online" for n in status.get("nodes", []))
        lines.append(f"sites: {online} online of {len(status.get('nodes', []))} registered")
    else:
        lines.append("sites:")
    for name, site in sorted(view["sites"].items()):
        lines.append(_site_line(name, site, nodes.get(name)))
    lines.append("  (epsilon: record-level, as each site reported it with its budget; a stale "
                 "value is from before the site stopped answering)")
    if status["last_accuracy"] is not None:
        lines.append(f"few-shot validation accuracy (last evaluation): "
                     f"{status['last_accuracy']:.3f}")
    if status["central_epsilon"] is not None:
        lines.append(f"site-level (central) epsilon at the server: {status['central_epsilon']:.3f}")
    return lines
