"""What the server writes and says about each round: metrics, checkpoints, progress, logs.

:class:`RunRecorder` is the strategy's :class:`~server.strategy.RoundRecorder`: it
appends every round record to ``metrics.jsonl``, writes the checkpoint of a completed
round, keeps ``progress.json`` (the round and phase in progress, for ``server status``
and the dashboard), feeds TensorBoard (:mod:`server.tracking`) and logs one line per
round naming the sites that did not contribute and why.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from medmeta_common.checkpoint import checkpoint_payload
from medmeta_common.config import MethodConfig
from medmeta_common.progress import Bar
from server.meta_update import MetaOptimizer
from server.round_outcome import site_reasons
from server.state import RunState
from server.tracking import RunTracker

log = logging.getLogger("medmeta.server")


class RunRecorder:
    """Writes the checkpoint, metrics and progress of each round, and logs it."""

    def __init__(self, state: RunState, config: MethodConfig, meta_optimizer: MetaOptimizer,
                 prior: str, tracker: RunTracker | None = None) -> None:
        self.state = state
        self.config = config
        self.meta_optimizer = meta_optimizer
        self.prior = prior
        self.tracker = tracker or RunTracker(state.out_dir)
        self.started = time.time()
        self.bar = Bar(None, None)  # the rounds bar, on a terminal

    def progress(self, status: str, **fields: Any) -> None:
        """Replace ``progress.json``: ``status`` is running, finished or failed."""
        self.state.write_progress({"status": status, "rounds_planned": self.config.rounds,
                                   "run_started": self.started, "updated": time.time(),
                                   "config_hash": self.config.hash(), **fields})

    def round_started(self, round_number: int, phase: str, sites: list[str]) -> None:
        """A phase of a round has begun: ``progress.json`` says which, and since when."""
        self.progress("running", round=round_number, phase=phase, sites_asked=sites,
                      phase_started=time.time())

    def train_done(self, round_number: int, encoder: dict[str, np.ndarray],
                   record: dict[str, Any]) -> None:
        """Metrics line first, then the checkpoint (a crash in between re-runs the round)."""
        self.state.append_metrics(record)
        payload = checkpoint_payload(
            round_number=round_number, encoder_state=encoder,
            image=asdict(self.config.image), model=asdict(self.config.model),
            config_hash=self.config.hash(), federation=self.config.name,
            server_optimizer=self.meta_optimizer.state_dict(),
            prior={"sha256": self.prior, "weights": self.config.model.weights,
                   "trainable": self.config.train.trainable, "seed": str(self.config.seed)})
        self.state.save_checkpoint(round_number, payload)
        self.tracker.train(record)
        self.bar.advance()
        sites = record["sites"]
        epsilons = [m["epsilon"] for m in sites.values() if isinstance(m.get("epsilon"), float)]
        others = site_reasons(sites)
        central = record.get("central_epsilon")
        log.info("round %d/%d: %d/%d site update(s) accepted%s%s (%.1f s)", round_number,
                 self.config.rounds, record["accepted"], len(sites),
                 f", max epsilon {max(epsilons):.2f}" if epsilons else "",
                 f", site-level (central) epsilon {central:.2f}" if central is not None else "",
                 record["seconds"])
        for site, why in others.items():
            log.warning("round %d: site %s: %s", round_number, site, why)
        spent = ", ".join(f"{s} {m['epsilon']:.2f}" + (f"/{m['epsilon-budget']:g}"
                                                         if "epsilon-budget" in m else "")
                          for s, m in sorted(sites.items()) if isinstance(m.get("epsilon"),
                                                                          float))
        if spent:
            log.info("round %d: epsilon per site (spent/budget): %s", round_number, spent)

    def round_failed(self, round_number: int, record: dict[str, Any]) -> None:
        """A failed attempt: kept in the metrics (``phase: failed``), never checkpointed."""
        self.state.append_metrics(record)
        self.tracker.failed(record)
        for site, why in site_reasons(record.get("sites", {})).items():
            log.warning("round %d (failed attempt %d): site %s: %s", round_number,
                        record["attempt"], site, why)

    def evaluate_done(self, round_number: int, record: dict[str, Any]) -> None:
        """Append the evaluation line and log the mean accuracy."""
        self.state.append_metrics(record)
        self.tracker.evaluate(record)
        if record["accuracy_mean"] is not None:
            per_site = ", ".join(f"{s} {m['accuracy']:.3f}" for s, m in record["sites"].items()
                                 if "accuracy" in m)
            log.info("round %d/%d: few-shot validation accuracy %.3f (%s)", round_number,
                     self.config.rounds, record["accuracy_mean"], per_site)
        dice = {s: m["dice"] for s, m in record["sites"].items() if "dice" in m}
        if dice:
            log.info("round %d/%d: segmentation validation Dice %s", round_number,
                     self.config.rounds, ", ".join(f"{s} {d:.3f}" for s, d in dice.items()))
        boxes = {s: m["map50"] for s, m in record["sites"].items() if "map50" in m}
        if boxes:
            log.info("round %d/%d: detection validation mAP@0.5 %s", round_number,
                     self.config.rounds, ", ".join(f"{s} {d:.3f}" for s, d in boxes.items()))
