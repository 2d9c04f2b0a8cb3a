"""The strict/lenient bad-file policy in one place."""

from __future__ import annotations

import logging
from typing import Literal

from medmeta_common.data.records import LoadIssue
from medmeta_common.errors import DataError

log = logging.getLogger(__name__)

Policy = Literal["strict", "lenient"]


class IssueLog:
    """Collects bad files; under ``strict`` the first one stops the load.

    Parameters
    ----------
    policy : {"strict", "lenient"}
        ``strict`` raises :class:`DataError` naming the first bad file; ``lenient``
        records it (and logs a warning) so the caller can skip it and carry on.

    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.issues: list[LoadIssue] = []

    def report(self, file: str, reason: str) -> None:
        """Record one bad file, or raise under the strict policy."""
        if self.policy == "strict":
            raise DataError(file, reason + " (strict policy: stopping at the first bad file)")
        log.warning("skipping %s: %s", file, reason)
        self.issues.append(LoadIssue(file=file, reason=reason))

    def report_error(self, error: DataError) -> None:
        """Record a :class:`DataError` raised by a reader."""
        self.report(error.file, error.reason)
