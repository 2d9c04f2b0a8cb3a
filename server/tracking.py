"""TensorBoard event files of a run, next to its ``metrics.jsonl``: ``tensorboard --logdir runs/``.

Optional (``pip install 'medmeta[tracking]'``, which brings the ``tensorboard``
package that :mod:`torch.utils.tensorboard` writes with); without it the run says
once how to turn it on and writes only the JSONL, CSV and plots.

What is written, per round: accepted updates, failed attempts, round seconds, the
global update's norm, each site's ε (and the central ε, with site-level DP), each
site's update norm — under secure aggregation the server never sees a site's update,
so only the aggregate's norm — and the few-shot validation accuracy (mean and per
site) or segmentation Dice. Everything comes from the round records the server writes
anyway: nothing a site did not already send.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class ScalarWriter(Protocol):
    """The part of TensorBoard's ``SummaryWriter`` used here."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        """One value of one series at one step."""

    def flush(self) -> None:
        """Write pending events to disk."""

    def close(self) -> None:
        """Flush and close the event file."""


def tensorboard_available() -> bool:
    """Whether the optional ``tensorboard`` package is installed."""
    return importlib.util.find_spec("tensorboard") is not None


class RunTracker:
    """Writes a run's round records as TensorBoard scalars (or nothing, when not installed).

    Parameters
    ----------
    out_dir : Path
        The run directory; the event file goes into it, beside ``metrics.jsonl``.

    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._writer: ScalarWriter | None = None
        if not tensorboard_available():
            log.info("TensorBoard tracking is off: install it with pip install "
                     "'medmeta[tracking]' (metrics are in %s/metrics.jsonl)", out_dir)
            return
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.out_dir))

    @property
    def enabled(self) -> bool:
        """Whether event files are written."""
        return self._writer is not None

    def _scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def train(self, record: Mapping[str, Any]) -> None:
        """A completed training round."""
        step = int(record["round"])
        values: dict[str, Any] = {"round/accepted_sites": record.get("accepted"),
                                  "round/seconds": record.get("seconds"),
                                  "round/global_update_norm": record.get("update_norm"),
                                  "privacy/central_epsilon": record.get("central_epsilon")}
        for site, metrics in record.get("sites", {}).items():
            values[f"privacy/epsilon/{site}"] = metrics.get("epsilon")
            # Under secure aggregation no per-site update reaches the server.
            values[f"update_norm/{site}"] = metrics.get("update_norm")
        self._scalars(step, values)

    def failed(self, record: Mapping[str, Any]) -> None:
        """A failed attempt of a round (the count of attempts so far)."""
        self._scalars(int(record["round"]), {"round/failed_attempts": record.get("attempt")})

    def evaluate(self, record: Mapping[str, Any]) -> None:
        """A round's federated evaluation."""
        values: dict[str, Any] = {"validation/accuracy_mean": record.get("accuracy_mean")}
        for site, metrics in record.get("sites", {}).items():
            values[f"validation/accuracy/{site}"] = metrics.get("accuracy")
            values[f"validation/dice/{site}"] = metrics.get("dice")
            values[f"validation/map50/{site}"] = metrics.get("map50")
        self._scalars(int(record["round"]), values)

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
