"""The meta-learning strategy: Flower's FedAvg round loop with a meta-update in its hooks.

Flower's ``Strategy.start`` owns the round loop; we only override hooks:

- ``configure_train`` / ``configure_evaluate`` remember the current global encoder,
  learn the names of newly connected sites, stamp the global round number (a
  resumed run continues counting; a failed round is tried again under the same
  number), and tell each site what became of its previous update.
- ``aggregate_train`` checks every reply (an error, a refusal, a malformed update, or
  one longer than ``server.max_update_norm`` is logged with the site's name and left
  out; see :mod:`server.update_checks`), aggregates the accepted encoders with
  ``server.aggregator`` (:func:`server.aggregation.aggregate`), applies the
  meta-update, and writes a checkpoint and a metrics line before the next round
  starts. A round with fewer than ``min_sites`` accepted updates fails instead: no
  meta-update, no checkpoint, and the round is retried (:mod:`server.round_outcome`).
- Validation (the sites' few-shot metric of a global encoder) rides on the next
  round's train messages: the server asks for it with ``validate-round`` and each
  site scores the encoder it receives before training, so a round costs each site
  one message. ``aggregate_train`` records it for the round that produced the
  encoder. Only the run's last round (no next round to carry it) and secure-
  aggregation runs (whose train replies go through SecAgg+) send separate evaluate
  messages, which ``aggregate_evaluate`` records.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from medmeta_common.privacy.central_dp import central_epsilon
from medmeta_common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVALUATE_METRICS,
    METRICS_KEY,
    NUM_EXAMPLES,
    TRAIN_METRICS,
    VALIDATE_ROUND,
    VALIDATION_KEY,
    check_update,
    finite_float,
)
from medmeta_common.update_codec import decode_update, encoded_layout, payload_bytes
from medmeta_common.wire import arrays_to_numpy, numpy_to_arrays
from server.aggregation import server_target
from server.meta_update import MetaOptimizer
from server.round_outcome import RoundsFailedError, failure_message, failure_reason
from server.sites import SiteDirectory
from server.update_checks import screen_update, update_norm

log = logging.getLogger(__name__)

Layout = dict[str, tuple[tuple[int, ...], str]]


class RoundRecorder(Protocol):
    """Where the strategy reports each round (checkpoints, metrics, progress)."""

    def train_done(self, round_number: int, encoder: dict[str, np.ndarray],
                   record: dict[str, Any]) -> None:
        """After aggregation: the new global encoder and the round's train record."""

    def evaluate_done(self, round_number: int, record: dict[str, Any]) -> None:
        """After federated evaluation: the round's evaluation record."""

    def round_failed(self, round_number: int, record: dict[str, Any]) -> None:
        """A training round without a meta-update (it will be retried, or the run stops)."""

    def round_started(self, round_number: int, phase: str, sites: list[str]) -> None:
        """A phase (``train`` or ``evaluate``) of a round has asked ``sites``."""


class MetaStrategy(FedAvg):
    """Reptile / first-order FedMeta on Flower's round loop.

    Parameters
    ----------
    meta_optimizer : MetaOptimizer
        Applies the meta-update (and holds its state for checkpoints); its ``config``
        (the ``server`` section) also names the aggregator and the update-norm bound.
    layout : dict
        Expected ``name -> (shape, dtype)`` of an encoder update.
    min_sites : int
        Fewest accepted updates for a meta-update; below it the encoder is kept.
    round_offset : int
        Rounds already done (a resumed run): the first round is global round
        ``round_offset + 1``.
    recorder : RoundRecorder
        Told about every round, to write checkpoints and metrics.
    fraction_train, fraction_evaluate : float
        Fractions of connected sites asked to train / evaluate each round.
    evaluate_every : int
        Ask for validation accuracy every this many rounds, and in ``last_round``.
    validate_in_train : bool
        Ask for it in the next round's train messages (one message per site per
        round) rather than in separate evaluate messages; the last round's always
        goes in an evaluate message.
    last_round : int, optional
        The run's final (global) round.
    score_resumed : bool
        Whether a resumed run's first train messages score the encoder it resumes
        from (``False`` when the metrics already hold that round's evaluation).
    query_timeout : float
        Seconds to wait for a new site to say its name.
    max_failed_rounds : int
        Failed attempts of one round, in a row, after which the run stops
        (:class:`~server.round_outcome.RoundsFailedError`).
    wait_for_sites : int, optional
        Connected sites a round waits for before sampling (default ``min_sites``).

    """

    def __init__(
        self,
        *,
        meta_optimizer: MetaOptimizer,
        layout: Layout,
        min_sites: int,
        round_offset: int,
        recorder: RoundRecorder,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        evaluate_every: int = 1,
        validate_in_train: bool = True,
        last_round: int | None = None,
        score_resumed: bool = True,
        query_timeout: float = 120.0,
        max_failed_rounds: int = 3,
        wait_for_sites: int | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites if fraction_evaluate > 0 else 0,
            min_available_nodes=max(min_sites, wait_for_sites or 0),
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.meta_optimizer = meta_optimizer
        self.layout = layout
        self.min_sites = min_sites
        self.round_offset = round_offset
        self.rounds_done = round_offset
        self.failed_in_a_row = 0
        self.max_failed_rounds = max_failed_rounds
        self.recorder = recorder
        self.query_timeout = query_timeout
        self.evaluate_every = evaluate_every
        self.validate_in_train = validate_in_train
        self.last_round = last_round
        self.sites = SiteDirectory()
        self._current: dict[str, np.ndarray] | None = None
        self._sites_asked = 0
        self._asked: list[int] = []
        self._round_number = round_offset + 1
        # The round whose encoder the next evaluation scores (None after a failed round).
        self._evaluated_round: int | None = None
        # The round whose encoder the next train messages carry and should score (a
        # resumed run scores the encoder it resumes from, unless its run already did).
        self._validate_next: int | None = round_offset if round_offset and score_resumed \
            and self.evaluates(round_offset) and self.validates_in_train(round_offset) \
            else None

        # Central-DP noise must be unpredictable: fresh OS entropy, never the run seed.
        self._noise = np.random.default_rng(secrets.randbits(128))
        self._round_started = time.monotonic()

    # --- helpers ---------------------------------------------------------------------

    @property
    def site_names(self) -> dict[int, str]:
        """Node id -> the name each site gave (see :class:`server.sites.SiteDirectory`)."""
        return self.sites.names

    @site_names.setter
    def site_names(self, names: dict[int, str]) -> None:
        self.sites.names = dict(names)

    def site_name(self, node_id: int) -> str:
        """The registered name of a node, else the name it gave, else its node id."""
        return self.sites.name(node_id)

    def learn_site_names(self, grid: Grid) -> None:
        """Ask newly connected sites for their names (operator metadata, not data)."""
        self.sites.learn(grid, timeout=self.query_timeout)

    @property
    def current(self) -> dict[str, np.ndarray]:
        """The global encoder (after the last completed round)."""
        assert self._current is not None, "the first round has not started"
        return self._current

    @property
    def next_round(self) -> int:
        """The global number of the round to train next (a failed round keeps it)."""
        return self.rounds_done + 1

    # --- Strategy hooks ----------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember the global encoder and ask a sample of sites to train."""
        self.begin_round(arrays_to_numpy(arrays))
        # Wait for the sites first: Flower sizes its sample from the sites connected
        # *before* it waits, so a site connecting during the wait would be left out.
        sample_nodes(grid, self.min_available_nodes, 0)
        if self._validate_next is not None:
            config = ConfigRecord({**dict(config), VALIDATE_ROUND: self._validate_next})
        messages = list(super().configure_train(self.next_round, arrays, config, grid))
        self.learn_site_names(grid)
        self.sites_asked([m.metadata.dst_node_id for m in messages])
        return self.sites.with_feedback(messages)

    def sites_asked(self, nodes: list[int]) -> None:
        """The sites asked to train this round (both round drivers)."""
        self._asked = list(nodes)
        self._sites_asked = len(nodes)
        self.recorder.round_started(self._round_number, "train",
                                    sorted(self.site_name(n) for n in nodes))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Ask a sample of sites for few-shot validation accuracy (every k-th round)."""
        round_number = self._evaluated_round
        if round_number is None or not self.evaluates(round_number) \
                or self.validates_in_train(round_number):
            return []  # each evaluate message costs every site a process start when deployed
        messages = list(super().configure_evaluate(round_number, arrays, config, grid))
        self.recorder.round_started(round_number, "evaluate", sorted(
            self.site_name(m.metadata.dst_node_id) for m in messages))
        return self.sites.with_feedback(messages)

    def evaluates(self, round_number: int) -> bool:
        """Whether sites are asked for validation accuracy after ``round_number``."""
        return round_number % self.evaluate_every == 0 or round_number == self.last_round

    def validates_in_train(self, round_number: int) -> bool:
        """Whether the encoder of ``round_number`` is scored by the next train messages."""
        return self.validate_in_train and round_number != self.last_round \
            and self.fraction_evaluate > 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check replies, meta-update the encoder, checkpoint; see the module docstring."""
        round_number = self._round_number
        assert self._current is not None, "configure_train runs before aggregate_train"
        accepted: list[tuple[str, dict[str, np.ndarray], float]] = []
        sites: dict[str, dict[str, Any]] = {}
        # In site-name order: the aggregate's floating-point sums then do not depend on
        # which site answered first.
        replies = from_sites(replies)
        for reply in sorted(replies, key=lambda r: self.site_name(r.metadata.src_node_id)):
            name = self.site_name(reply.metadata.src_node_id)
            verdict, metrics, arrays = self._judge_train_reply(reply)
            sites[name] = {"status": verdict, **metrics}
            if verdict == "accepted" and arrays is not None:
                accepted.append((name, arrays, float(metrics[NUM_EXAMPLES])))
        for node in self.missing(replies):
            sites[self.site_name(node)] = {"status": "dropped"}
        self._record_validation_in(replies)
        record: dict[str, Any] = {"round": round_number, "phase": "train", "sites": sites,
                                  "accepted": len(accepted)}
        target = None
        if len(accepted) >= self.min_sites:
            target = server_target([a for _, a, _ in accepted], [w for _, _, w in accepted],
                                   self._current, self.meta_optimizer.config,
                                   sites_asked=self._sites_asked, rng=self._noise)
        new = self.close_round(record, target)
        return numpy_to_arrays(new), MetricRecord({"accepted-sites": len(accepted)})

    def missing(self, replies: Iterable[Message]) -> list[int]:
        """Nodes asked this round that did not answer."""
        answered = {r.metadata.src_node_id for r in replies}
        return [n for n in self._asked if n not in answered]

    def close_round(self, record: dict[str, Any],
                    target: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """End a training round: meta-update toward ``target``, record it, checkpoint.

        ``target`` is the aggregate of the accepted updates, or ``None`` when too few
        sites contributed: the round then fails (:meth:`fail_round`). Both round drivers
        (this strategy's, and secure aggregation's) end every round here.
        """
        assert self._current is not None, "a round starts before it closes"
        round_number = int(record["round"])
        self.sites.remember(record, self._asked, self.min_sites)
        if target is None:
            self.fail_round(record)
            return self._current
        server = self.meta_optimizer.config
        if server.central_dp is not None:
            dp = server.central_dp
            record["central_epsilon"] = central_epsilon(dp.noise_multiplier, round_number,
                                                        dp.delta)
            record["central_delta"] = dp.delta
        new = self.meta_optimizer.step(self._current, target)
        record["update_norm"] = update_norm(new, self._current)
        record["seconds"] = round(time.monotonic() - self._round_started, 3)
        record["time"] = round(time.time(), 3)
        self.recorder.train_done(round_number, new, record)
        self._current = new
        self.rounds_done = round_number
        self.failed_in_a_row = 0
        self._evaluated_round = round_number
        self._validate_next = round_number if self.evaluates(round_number) \
            and self.validates_in_train(round_number) else None
        return new

    def fail_round(self, record: dict[str, Any]) -> None:
        """A round without enough accepted updates: it does not count, and is retried.

        The global encoder is kept, no checkpoint is written and the round counter
        stays; the attempt is logged and kept in the metrics (``phase: failed``). After
        ``max_failed_rounds`` failures in a row, :class:`RoundsFailedError` stops the run.
        """
        self.failed_in_a_row += 1
        self._evaluated_round = None
        record.update({"phase": "failed", "attempt": self.failed_in_a_row,
                       "reason": failure_reason(record, self.min_sites),
                       "seconds": round(time.monotonic() - self._round_started, 3),
                       "time": round(time.time(), 3)})
        self.recorder.round_failed(int(record["round"]), record)
        if self.failed_in_a_row >= self.max_failed_rounds:
            raise RoundsFailedError(failure_message(record, self.min_sites,
                                                    self.failed_in_a_row))
        log.error("round %d failed (attempt %d of %d): %s; the global encoder is kept and "
                  "the round is tried again", record["round"], self.failed_in_a_row,
                  self.max_failed_rounds, record["reason"])

    def judge_metrics(self, name: str, metric_record: Mapping[str, Any] | None
                      ) -> tuple[str, dict[str, Any]]:
        """The verdict on a reply's metrics: ``accepted``, ``refused`` or ``rejected``.

        Both round drivers judge every reply's metrics here: unexpected metrics (a site
        may release nothing else), a refusal (its budget is spent), a bad record count.
        """
        if metric_record is None or set(metric_record) - TRAIN_METRICS:
            extra = sorted(set(metric_record or {}) - TRAIN_METRICS)
            log.warning("rejected update from site %s: unexpected metrics %s", name, extra)
            return "rejected", {"reason": f"unexpected metrics {extra}"}
        metrics = dict(metric_record)
        if metrics.get("refused"):
            log.info("site %s refused to train: its privacy budget is spent "
                     "(epsilon %.3f)", name, float(metrics.get("epsilon", float("nan"))))
            return "refused", metrics
        weight = finite_float(metrics.get(NUM_EXAMPLES))
        if weight is None or weight <= 0:
            log.warning("rejected update from site %s: bad record count %r", name,
                        metrics.get(NUM_EXAMPLES))
            return "rejected", {"reason": "bad record count"}
        return "accepted", metrics

    def _judge_train_reply(self, reply: Message
                           ) -> tuple[str, dict[str, Any], dict[str, np.ndarray] | None]:
        name = self.site_name(reply.metadata.src_node_id)
        if reply.has_error():
            log.warning("round update from site %s failed: %s", name, reply.error.reason)
            return "failed", {"reason": str(reply.error.reason)[:300]}, None
        content = reply.content
        verdict, metrics = self.judge_metrics(name, content.metric_records.get(METRICS_KEY))
        if verdict != "accepted":
            return verdict, metrics, None
        if set(content.array_records) != {ARRAYS_KEY} or content.config_records \
                or set(content.metric_records) - {METRICS_KEY, VALIDATION_KEY}:
            log.warning("rejected update from site %s: unexpected records in the reply", name)
            return "rejected", {"reason": "unexpected records"}, None
        try:
            arrays = arrays_to_numpy(content.array_records[ARRAYS_KEY])
        except ValueError as exc:  # a packed record that does not add up
            log.warning("rejected update from site %s: %s", name, exc)
            return "rejected", {"reason": str(exc)[:300]}, None
        assert self._current is not None, "configure_train runs before aggregate_train"
        sent_bytes = payload_bytes(arrays)
        encoding = self.meta_optimizer.config.update_encoding
        if encoding != "float32":
            problem = check_update(arrays, encoded_layout(self.layout, encoding))
            if problem:
                log.warning("rejected update from site %s: %s (%s encoding)", name, problem,
                            encoding)
                return "rejected", {"reason": f"{problem} ({encoding} encoding)"}, None
            arrays = decode_update(arrays, self._current, encoding)
        problem = screen_update(arrays, self._current, self.layout,
                                max_update_norm=self.meta_optimizer.config.max_update_norm)
        if problem:
            log.warning("rejected update from site %s: %s", name, problem)
            return "rejected", {"reason": problem}, None
        return "accepted", {**metrics, "update_norm": update_norm(arrays, self._current),
                            "update_bytes": sent_bytes}, arrays

    def begin_round(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Start a round from the global encoder ``arrays`` (both round drivers)."""
        self._round_number = self.next_round
        self._round_started = time.monotonic()
        self._current = dict(arrays)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Collect per-site few-shot validation metrics (separate evaluate messages)."""
        round_number = self._evaluated_round
        if round_number is None or not self.evaluates(round_number) \
                or self.validates_in_train(round_number):
            return None
        sites: dict[str, dict[str, Any]] = {}
        for reply in from_sites(replies):
            name = self.site_name(reply.metadata.src_node_id)
            if reply.has_error():
                log.warning("evaluation at site %s failed: %s", name, reply.error.reason)
                continue
            sites[name] = allowed_validation(reply.content.metric_records.get(METRICS_KEY))
        mean = self._record_validation(round_number, sites, {})
        return MetricRecord({"accuracy": mean}) if mean is not None else None

    def _record_validation_in(self, replies: list[Message]) -> None:
        """Record the validation the train ``replies`` carry (once per validated round)."""
        round_number = self._validate_next
        if round_number is None:
            return
        sites = {self.site_name(r.metadata.src_node_id):
                 allowed_validation(r.content.metric_records.get(VALIDATION_KEY))
                 for r in replies
                 if not r.has_error() and VALIDATION_KEY in r.content.metric_records}
        if sites:  # a round retried after this one failed is not asked again
            self._record_validation(round_number, sites, {"with_train": self._round_number})
            self._validate_next = None

    def _record_validation(self, round_number: int, sites: dict[str, dict[str, Any]],
                           extra: dict[str, Any]) -> float | None:
        """Write the evaluation record of ``round_number``; return the mean accuracy."""
        scored = [m["accuracy"] for m in sites.values() if "accuracy" in m]
        mean = float(np.mean(scored)) if scored else None
        self.recorder.evaluate_done(round_number, {"round": round_number, "phase": "evaluate",
                                                   "sites": sites, "accuracy_mean": mean,
                                                   **extra, "time": round(time.time(), 3)})
        return mean


def from_sites(replies: Iterable[Message]) -> list[Message]:
    """The replies sites sent; the SuperLink's own error replies are logged and dropped.

    When a message cannot reach its site (the node is gone, the message expired), the
    SuperLink answers for it with an error whose source is the SuperLink itself (node
    1), not the site: counting it would name a site "node-1". The site is then one
    that did not answer (``dropped``).
    """
    kept = []
    for reply in replies:
        if reply.metadata.src_node_id == SUPERLINK_NODE_ID:
            reason = reply.error.reason if reply.has_error() else "no content"
            log.warning("the SuperLink could not deliver a message to a site: %s", reason)
            continue
        kept.append(reply)
    return kept


def allowed_validation(record: Mapping[str, Any] | None) -> dict[str, Any]:
    """A site's validation metrics, keeping only those the reply contract allows."""
    return {k: v for k, v in (record or {}).items() if k in EVALUATE_METRICS}
