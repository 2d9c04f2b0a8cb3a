"""Our log lines inside Flower's processes, and the third-party warnings nobody can act on.

Flower runs the ServerApp and the ClientApp in processes it starts (``flwr-serverapp``,
``flwr-clientapp``, Ray actors of the simulation runtime). What they write to stderr
reaches ``flwr log`` / ``flwr run --stream`` (the ServerApp's) and the site's terminal
(the ClientApp's, through its SuperNode), but those processes configure no handler for
our loggers: Python would print only warnings, without a time. :func:`log_in_flower_process`
gives our loggers one timestamped handler there (and leaves a process alone whose
logging is already configured: the ``medmeta`` command, pytest).

:data:`THIRD_PARTY_WARNINGS` are filtered by name, one by one, each with the reason
it says nothing a user could act on; anything else still shows.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TextIO

# The top-level loggers of our packages.
OUR_LOGGERS = ("medmeta", "server", "client", "medmeta_common")

# (message regex, category, module regex) of warnings filtered everywhere we run.
THIRD_PARTY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Opacus' RDP accountant when the best Rényi order is an end of the range tried:
    # the noise calibration's binary search probes extreme noise levels, and very short
    # runs peak at the largest order. The ε reported is then an upper bound (never an
    # under-estimate) of the true value: nothing is overspent.
    (r"Optimal order is the (largest|smallest) alpha", UserWarning, ""),
    # torch, when Opacus' per-sample-gradient hooks fire on a first layer whose input
    # (the images) needs no gradient: the hooks use the output gradients, as intended.
    (r"Full backward hook is firing when gradients are computed with respect to module "
     r"outputs", UserWarning, ""),
    # Ray's notice about a future default for GPU visibility (the simulation runtime).
    (r"Tip: In future versions of Ray", FutureWarning, ""),
)


def quiet_third_party_warnings() -> None:
    """Ignore exactly the third-party warnings in :data:`THIRD_PARTY_WARNINGS`."""
    for message, category, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


class CurrentStderrHandler(logging.StreamHandler[TextIO]):
    """A handler writing to whatever ``sys.stderr`` is *now*.

    Flower mirrors ``sys.stderr`` into its log stream, and a live progress bar swaps it
    for a proxy that prints above the bar; a handler bound to the original stream at
    start-up would bypass both.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        """The current ``sys.stderr``."""
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass  # always the current sys.stderr


def log_in_flower_process(level: int = logging.INFO) -> None:
    """Give our loggers a timestamped stderr handler in a process Flower started.

    Safe to call on every message (it adds the handler once). A process whose root
    logger already has handlers (the ``medmeta`` command, pytest) is left alone.
    """
    quiet_third_party_warnings()
    if logging.getLogger().handlers:
        return
    formatter = logging.Formatter("%(asctime)s medmeta %(levelname)s: %(message)s",
                                  datefmt="%Y-%m-%d %H:%M:%S")
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if any(isinstance(h, CurrentStderrHandler) for h in logger.handlers):
            continue
        handler = CurrentStderrHandler()
        handler.setFormatter(formatter)
        logger.addHandler(handler)
        logger.setLevel(level)
        # Ray configures the root logger of its workers later: one line, not two.
        logger.propagate = False
