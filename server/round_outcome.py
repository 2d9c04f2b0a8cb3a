"""What a training round's outcome says: which sites did not contribute, and why.

A training round *fails* when fewer than ``server.min_sites`` updates are accepted
(sites failed, refused, were rejected or did not answer, or secure aggregation
aborted). A failed round does not count: the round counter does not advance, no
checkpoint is written, the global encoder is kept and the same round is tried again.
After ``server.max_failed_rounds`` failures in a row the run stops with
:class:`RoundsFailedError`, which names each site's reason. Both round drivers (the
strategy's and secure aggregation's) end every round in
:meth:`server.strategy.MetaStrategy.close_round`, which applies these rules.

A retried round costs privacy: every site that trained in the failed attempt spent
budget on it (its update left the site). Sites calibrate their noise once, for
``rounds + server.spare_rounds`` rounds; without spare rounds a retry makes a site
run out of budget before the last round, and it then refuses to train (the budget
guard never overspends), so the run stops with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medmeta_common.errors import FederationError


class RoundsFailedError(FederationError):
    """The same round failed ``server.max_failed_rounds`` times in a row."""


def site_reason(metrics: Mapping[str, Any]) -> str | None:
    """Why a site's update is not in the round (``None`` when it was accepted)."""
    status = metrics.get("status")
    if status == "accepted":
        return None
    if status == "refused":
        spent = metrics.get("epsilon")
        budget = metrics.get("epsilon-budget")
        spend = f"epsilon {spent:.3f}" if isinstance(spent, (int, float)) else "epsilon ?"
        if isinstance(budget, (int, float)):
            spend += f" of {budget:g}"
        return f"refused: its privacy budget is spent ({spend})"
    if status == "dropped":
        return "no reply (offline, or slower than server.round_timeout)"
    if status == "aborted":
        return "secure aggregation aborted before its update was counted"
    reason = metrics.get("reason")
    return f"{status}: {reason}" if reason else str(status)


def site_reasons(sites: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``site -> reason`` for every site whose update is not in the round."""
    return {name: reason for name, metrics in sorted(sites.items())
            if (reason := site_reason(metrics)) is not None}


def failure_reason(record: Mapping[str, Any], min_sites: int) -> str:
    """One line: why the round has no meta-update."""
    reason = (f"{record.get('accepted', 0)} accepted update(s), fewer than "
              f"min_sites={min_sites}")
    if record.get("aborted"):
        reason += f"; {record['aborted']}"
    if record.get("rejected_sum"):
        reason += f"; {record['rejected_sum']}"
    return reason


def failure_message(record: Mapping[str, Any], min_sites: int, attempts: int) -> str:
    """The error that stops a run: the round, how often it failed, each site's reason."""
    sites = site_reasons(record.get("sites", {}))
    named = "; ".join(f"{name}: {why}" for name, why in sites.items()) or \
        "no site was asked (none connected)"
    message = (f"round {record['round']} failed {attempts} time(s) in a row "
               f"({failure_reason(record, min_sites)}); the run stops. Sites: {named}")
    if any(why.startswith("refused") for why in sites.values()):
        message += (". A site that refused has spent its privacy budget and will not train "
                    "again in this run; retried rounds spend budget too (give sites spare "
                    "rounds with server.spare_rounds, see docs/privacy.md)")
    return message
