"""Will the sites' budgets last? A forecast from what the sites reported, for ``server start``.

Each site calibrates its noise once, for ``rounds + server.spare_rounds`` rounds, so the
planned rounds spend (nearly) its whole budget. A round trained twice — a failed
round retried, or the round in progress when the server restarts — is not planned
for: without spare rounds the site then refuses its last round. The server never sees
a ledger, but every train reply carries the site's ε, δ, noise multiplier, sampling
rate and steps, which is enough to project the ε of the remaining rounds with the
same accountant (:func:`medmeta_common.privacy.accounting.epsilon_of`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from medmeta_common.privacy.accounting import epsilon_of

# Rounds a restart may train twice (the one in progress when the server stopped).
REDO_ALLOWANCE = 1


def last_reports(records: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Each site's latest train metrics that carry its privacy figures."""
    latest: dict[str, Mapping[str, Any]] = {}
    for record in records:
        if record.get("phase") not in ("train", "failed"):
            continue
        for site, metrics in record.get("sites", {}).items():
            if all(isinstance(metrics.get(k), (int, float)) for k in
                   ("epsilon", "noise-multiplier", "sample-rate", "steps", "delta")):
                latest[site] = metrics
    return latest


def budget_warnings(records: Iterable[Mapping[str, Any]], *, rounds_left: int,
                    local_steps: int, spare_rounds: int) -> list[str]:
    """Warnings for the sites whose budget will not cover the rest of the run (and a redo)."""
    warnings = []
    reports = last_reports(records)
    if not reports and spare_rounds == 0:
        warnings.append(
            "server.spare_rounds is 0: the sites calibrate their noise for exactly the planned "
            "rounds, so any round trained twice (a failed round retried, or the round in "
            "progress when the server restarts) makes a site refuse its last round. Give "
            "spare rounds (e.g. spare_rounds: 2) before the first round")
    for site, m in sorted(reports.items()):
        budget = m.get("epsilon-budget")
        if not isinstance(budget, (int, float)) or rounds_left <= 0:
            continue
        steps = int(m["steps"]) + (rounds_left + REDO_ALLOWANCE) * local_steps
        projected = epsilon_of([(float(m["noise-multiplier"]), float(m["sample-rate"]), steps)],
                               float(m["delta"]))
        if projected > float(budget):
            warnings.append(
                f"site {site} has spent epsilon {float(m['epsilon']):.3f} of {budget:g}; the "
                f"{rounds_left} remaining round(s) plus {REDO_ALLOWANCE} redo would take it to "
                f"{projected:.3f}: it will refuse the last round(s) rather than overspend. "
                "Plan fewer rounds (--rounds), or see deploy/README.md (reset the walk-through)")
    return warnings
