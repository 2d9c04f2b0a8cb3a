"""Secure aggregation rounds: Flower's SecAgg+ protocol feeding the meta-update.

With ``server.secure_aggregation`` set, each training round runs Flower's
:class:`~flwr.server.workflow.SecAggPlusWorkflow` (setup, key sharing, masked
upload, unmasking) against the sites' ``secaggplus_mod``. What the server learns is
the record-weighted mean of the sites' updates, ``sum_i n_i (theta_i - theta) /
sum_i n_i``, plus each site's plain metrics (record count, ε spent, steps): never a
single site's update. The meta-update then proceeds as in
:class:`server.strategy.MetaStrategy`.

Flower ships SecAgg+ only for its legacy strategy interface, so
:class:`SecureRoundStrategy` is the small legacy face the workflow talks to:
``configure_fit`` samples the sites and ``aggregate_fit`` receives the unmasked mean.

What secure aggregation costs (see docs/privacy.md): the server cannot validate,
bound or robustly aggregate individual updates (the config refuses those options),
every coordinate is clipped to ``clipping_range`` and quantised, and each round takes
four message exchanges instead of one. A round in which fewer than the threshold of
sites survive is aborted: the global encoder is kept and the round is logged.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from medmeta_common.config import SecureAggregationConfig
from medmeta_common.protocol import check_update
from medmeta_common.wire import numpy_to_arrays, to_legacy_config
from server.strategy import MetaStrategy

log = logging.getLogger(__name__)


def _share_setting(value: float) -> int | float:
    """Flower reads an int as a count and a float as a fraction; YAML numbers arrive as floats."""
    return int(value) if value > 1 and float(value).is_integer() else float(value)


class StoppingSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, stopping at the first stage that fails.

    (Flower's own ``__call__`` logs a failed stage and still runs the next ones.)
    """

    def __call__(self, grid: Grid, context: Context) -> bool:  # type: ignore[override]
        """Run the four stages; ``False`` as soon as one fails (the round is aborted)."""
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        state = WorkflowState()
        for stage in (self.setup_stage, self.share_keys_stage,
                      self.collect_masked_vectors_stage, self.unmask_stage):
            if not stage(grid, context, state):  # type: ignore[arg-type]
                log.error("secure aggregation stopped at %s: %d of %d sampled site(s) "
                          "still answering, %d needed", stage.__name__,
                          len(state.active_node_ids), len(state.sampled_node_ids),
                          state.threshold)
                return False
        return True


class SecureRoundStrategy(Strategy):
    """The legacy strategy interface that :class:`SecAggPlusWorkflow` drives, for one round.

    It holds no aggregation logic: site metrics are judged by
    :meth:`MetaStrategy.judge_metrics`, and the round is closed (meta-update,
    checkpoint, metrics) by :meth:`MetaStrategy.close_round`, exactly as in plain rounds.
    """

    def __init__(self, meta: MetaStrategy, grid: Grid, settings: ConfigRecord,
                 current: dict[str, np.ndarray], round_number: int, fraction: float) -> None:
        self.meta = meta
        self.grid = grid
        self.settings = settings
        self.current = current
        self.round_number = round_number
        self.fraction = fraction
        self.sampled: list[int] = []
        self.target: dict[str, np.ndarray] | None = None
        self.record: dict[str, Any] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: Any) -> list[tuple[ClientProxy, FitIns]]:
        """Sample sites (waiting for ``min_sites``) and give each the round's settings."""
        sample_nodes(self.grid, self.meta.min_available_nodes, 0)  # wait, then size the sample
        connected = len(list(self.grid.get_node_ids()))
        size = max(self.meta.min_sites, math.ceil(self.fraction * connected))
        self.sampled, _ = sample_nodes(self.grid, self.meta.min_available_nodes, size)
        self.meta.learn_site_names(self.grid)
        self.meta.sites_asked(self.sampled)
        config: dict[str, Any] = {**dict(self.settings), "server-round": self.round_number}
        return [(GridClientProxy(node, self.grid, run_id=0),
                 FitIns(parameters, to_legacy_config({**config, **self.meta.sites.told(node)})))
                for node in self.sampled]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        """The aggregate target from the unmasked mean update; ``results`` carry it."""
        sites: dict[str, dict[str, Any]] = {}
        contributors = 0
        for proxy, fitres in sorted(results, key=lambda r: self.meta.site_name(r[0].node_id)):
            name = self.meta.site_name(proxy.node_id)
            # Flower's legacy fit format repeats the record count as "num_examples".
            metrics = {k: v for k, v in fitres.metrics.items() if k != "num_examples"}
            verdict, judged = self.meta.judge_metrics(name, metrics)
            sites[name] = {"status": verdict, **judged}
            contributors += int(verdict == "accepted")
        answered = {p.node_id for p, _ in results}
        for node in self.sampled:
            if node not in answered:
                sites[self.meta.site_name(node)] = {"status": "dropped"}
        self.record = {"round": self.round_number, "phase": "train", "sites": sites,
                       "accepted": contributors, "secure_aggregation": True}
        rejected = sorted(n for n, m in sites.items() if m["status"] == "rejected")
        if rejected:
            # The server cannot take a masked update out of the sum: a reply it would
            # reject taints the whole round, so the global encoder is kept.
            log.error("round %d: site(s) %s sent replies the server rejects; their updates "
                      "are inside the masked sum, so the global encoder is kept",
                      self.round_number, ", ".join(rejected))
            self.record["rejected_sum"] = f"rejected site(s) in the sum: {rejected}"
            self.record["accepted"] = 0
            return None, {}
        if contributors < self.meta.min_sites:
            return None, {}
        # Every result carries the same unmasked mean (Flower's workflow sets it on each).
        mean_update = dict(zip(self.current, parameters_to_ndarrays(results[0][1].parameters),
                               strict=False))
        problem = check_update({k: np.asarray(v, np.float32) for k, v in mean_update.items()},
                               self.meta.layout)
        if problem:
            log.error("round %d: the unmasked sum is malformed (%s); the global encoder is "
                      "kept", self.round_number, problem)
            self.record["rejected_sum"] = problem
            return None, {}
        self.target = {k: (v.astype(np.float64) + mean_update[k]).astype(v.dtype)
                       for k, v in self.current.items()}
        return None, {}

    # The workflow only calls the two methods above; evaluation runs on the Message API.
    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        """Unused: the run starts from the server's own encoder."""
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: Any) -> list[Any]:
        """Unused: evaluation is asked on the Message API after the round."""
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any],
                           failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
        """Unused (see ``configure_evaluate``)."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        """No server-side evaluation: the server holds no data."""
        return None


def run_secure_rounds(grid: Grid, meta: MetaStrategy, secure: SecureAggregationConfig, *,
                      initial: dict[str, np.ndarray], rounds: int, settings: ConfigRecord,
                      fraction_train: float, round_timeout: float) -> dict[str, np.ndarray]:
    """``rounds`` securely aggregated rounds (evaluation as the strategy asks); the last encoder.

    Flower's SecAgg+ needs its own per-round driver (its legacy workflow); each round
    still begins and closes through the strategy, as plain rounds do, so a failed round
    is retried, or stops the run, by the same rule.
    """
    workflow = StoppingSecAggPlus(
        num_shares=_share_setting(secure.num_shares),
        reconstruction_threshold=_share_setting(secure.reconstruction_threshold),
        max_weight=secure.max_weight, clipping_range=secure.clipping_range,
        quantization_range=secure.quantization_range,
        timeout=secure.timeout or round_timeout)
    current = initial
    last_round = meta.rounds_done + rounds
    while meta.rounds_done < last_round:  # a failed round is tried again (or raises)
        round_number = meta.next_round
        meta.begin_round(current)
        round_strategy = SecureRoundStrategy(meta, grid, settings, current, round_number,
                                             fraction_train)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={},
                                        state=RecordDict(), run_config={}),
                                strategy=round_strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: round_number})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(list(current.values())), keep_input=True)
        completed = workflow(grid, context)
        record = round_strategy.record or {
            "round": round_number, "phase": "train", "accepted": 0, "secure_aggregation": True,
            "sites": {meta.site_name(n): {"status": "aborted"} for n in round_strategy.sampled}}
        target = round_strategy.target
        if not completed:
            record["aborted"] = "fewer sites than the reconstruction threshold"
            record["accepted"] = 0
            log.error("round %d aborted: secure aggregation could not complete; the global "
                      "encoder is kept", round_number)
            target = None
        current = meta.close_round(record, target)
        arrays: ArrayRecord = numpy_to_arrays(current)
        questions = list(meta.configure_evaluate(round_number, arrays,
                                                 ConfigRecord(dict(settings)), grid))
        if questions:
            replies = grid.send_and_receive(questions, timeout=round_timeout)
            meta.aggregate_evaluate(round_number, replies)
    return current
