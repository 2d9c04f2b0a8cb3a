"""Logging set-up for the command line: one readable line per message, on stderr."""

from __future__ import annotations

import logging
import os

from medmeta_common.app_logging import CurrentStderrHandler, quiet_third_party_warnings

# Third-party loggers that are noisy at INFO and say nothing a user can act on.
QUIET_LOGGERS = ("monai", "ray", "opacus", "matplotlib", "PIL", "pydicom", "nibabel")


class _MinimumLevel(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def configure_logging(verbosity: int) -> None:
    """Log to stderr: warnings and up at -q, info by default, debug with -v."""
    level = logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO
    # The current sys.stderr: a progress bar redirects it to print log lines above itself.
    logging.basicConfig(level=level, format="medmeta %(levelname)s: %(message)s", force=True,
                        handlers=[CurrentStderrHandler()])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # Flower logs every round in detail through its own handler and resets its logger's
    # level on import; a filter survives that. Our own round summaries replace its lines.
    flower = logging.getLogger("flwr")
    flower.propagate = False
    for old in [f for f in flower.filters if isinstance(f, _MinimumLevel)]:
        flower.removeFilter(old)
    flower.addFilter(_MinimumLevel(logging.DEBUG if verbosity > 1 else logging.INFO
                                   if verbosity > 0 else logging.WARNING))
    # Third-party warnings nobody can act on, by name; anything else still shows.
    quiet_third_party_warnings()
    # No network: Flower's telemetry and update checks only slow a site down.
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
