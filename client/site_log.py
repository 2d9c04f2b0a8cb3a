"""The site's own log of the run: one line per round, the server's verdicts, the end of the run.

A hospital engineer watching ``medmeta site start`` sees, with a time on every line:
what the server did with the site's previous update (it says so in its next
message), each round it trained (steps, ε spent of the budget), a refusal when the
budget is spent, and the end of the run. The ClientApp calls these from its handlers
(:mod:`client.app`); the lines reach the terminal through the SuperNode.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from client.settings import RoundSettings, SiteRuntime
from medmeta_common.errors import PrivacyBudgetError
from medmeta_common.privacy.ledger import LEDGER_FILE, read_ledger

log = logging.getLogger("medmeta.site")


def log_previous_verdict(site: SiteRuntime, settings: RoundSettings) -> None:
    """What the server did with this site's previous update, if it told us."""
    if settings.previous_round and settings.previous_verdict:
        log.info("site %s: round %d result: our update was %s", site.name,
                 settings.previous_round, settings.previous_verdict)


def log_trained(site: SiteRuntime, settings: RoundSettings,
                metrics: Mapping[str, float | int]) -> None:
    """One line for a round this site was asked to train."""
    where = f"site {site.name}: round {settings.server_round}/{settings.planned_rounds}"
    if metrics.get("refused"):
        log.warning("%s: REFUSED to train: its privacy budget is spent (epsilon %.3f of "
                    "%g); no update sent", where, float(metrics.get("epsilon", 0.0)),
                    site.privacy.epsilon)
        return
    steps = int(metrics.get("round-steps", 0))
    seconds = float(metrics.get("compute-seconds", 0.0))
    if not metrics.get("dp"):
        log.info("%s: trained %d step(s) WITHOUT differential privacy in %.1f s; update "
                 "sent", where, steps, seconds)
        return
    log.info("%s: trained %d DP-SGD step(s) in %.1f s; epsilon %.3f of %g spent; update sent",
             where, steps, seconds, float(metrics.get("epsilon", 0.0)), site.privacy.epsilon)


def log_end_of_run(site: SiteRuntime, event: Mapping[str, Any]) -> None:
    """The server announced the end of the run."""
    rounds = int(event.get("rounds-done", 0))
    last = ""
    if event.get("previous-verdict"):
        last = f"; our last update (round {event.get('previous-round')}) was " \
               f"{event.get('previous-verdict')}"
    spent = _spent(site)
    if event.get("event") == "run-finished":
        log.info("site %s: run finished: %d round(s) done%s%s", site.name, rounds, last, spent)
    else:
        log.error("site %s: the server STOPPED the run after %d round(s): %s%s%s", site.name,
                  rounds, event.get("reason", ""), last, spent)


def _spent(site: SiteRuntime) -> str:
    path = site.state_dir / LEDGER_FILE
    if not site.privacy.enabled or not path.exists():
        return ""
    try:
        ledger = read_ledger(path)
    except (PrivacyBudgetError, OSError, ValueError, KeyError):
        return ""
    return f"; epsilon spent {ledger.epsilon:.3f} of {site.privacy.epsilon:g} (ledger {path})"
