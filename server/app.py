"""The aggregation server: a Flower ServerApp running the meta-learning strategy.

It starts from a fresh encoder (or the newest checkpoint when resuming), runs the
remaining rounds with :class:`server.strategy.MetaStrategy` on Flower's own round
loop, and after every completed round writes an atomic checkpoint and a metrics line
(:mod:`server.recorder`). A round with too few accepted updates is retried, and
stops the run after ``server.max_failed_rounds`` attempts (:mod:`server.round_outcome`).

The same ServerApp runs under ``medmeta server start`` (deployment: the run config
names the operator's ``server.yaml``) and under ``flwr run .`` in Flower's simulation
runtime (the run config names a federation YAML; :mod:`server.flwr_simulation`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from medmeta_common.app_logging import log_in_flower_process
from medmeta_common.checkpoint import atomic_write
from medmeta_common.config import MethodConfig
from medmeta_common.models.factory import build_encoder, trainable_arrays, trainable_layout
from medmeta_common.models.prior import PRIORS_DIR, prior_sha256
from medmeta_common.progress import progress_bar
from medmeta_common.protocol import flatten
from medmeta_common.wire import numpy_to_arrays, to_config_record
from server.meta_update import MetaOptimizer
from server.plots import write_plots, write_rounds_csv
from server.recorder import RunRecorder
from server.round_outcome import RoundsFailedError
from server.state import RunState
from server.strategy import MetaStrategy

log = logging.getLogger("medmeta.server")

# A simulated federation or a production server: both carry the method settings,
# ``min_sites`` and a ``hash()`` of what a resumed run must match.
RunConfig = MethodConfig


def settings_record(config: RunConfig, prior: str) -> ConfigRecord:
    """The settings every site needs each round, as flat typed entries.

    ``prior`` names the public prior by its SHA-256: a site whose prior differs refuses.
    """
    entries: dict[str, Any] = {}
    for prefix in ("image", "model", "train", "evaluation"):
        entries.update(flatten(getattr(config, prefix), prefix))
    entries.update({"planned-rounds": config.rounds, "seed": config.seed,
                    "update-encoding": config.server.update_encoding, "prior-sha256": prior,
                    "spare-rounds": config.server.spare_rounds})
    return to_config_record(entries)


def publish_prior(config: RunConfig, out_dir: Path) -> str:
    """The prior's SHA-256; a file prior is copied into ``out_dir/priors/<sha256>.pt``.

    The copy lets simulated sites and ``medmeta adapt`` at a new site find the prior
    by its hash next to the checkpoints (it is public: it holds no site's data).
    """
    sha = prior_sha256(config.model.weights)
    if config.model.has_file_prior:
        target = out_dir / PRIORS_DIR / f"{sha}.pt"
        if not target.exists():
            data = Path(config.model.weights).read_bytes()
            atomic_write(target, lambda handle: handle.write(data))
    return sha


def run_federation(grid: Grid, config: RunConfig, out_dir: Path, *, resume: bool,
                   registered: Mapping[int, str] | None = None) -> int:
    """Run (or resume) the federation on ``grid``; return the last round done.

    ``registered`` names authenticated nodes (node id -> the name the operator
    registered their key under). A round that fails ``server.max_failed_rounds`` times
    in a row stops the run with :class:`~server.round_outcome.RoundsFailedError`.
    """
    random.seed(config.seed)  # Flower samples sites with the `random` module
    state = RunState(out_dir)
    encoder = build_encoder(config.model, config.image, config.seed)
    trainable = config.train.trainable
    prior = publish_prior(config, out_dir)
    initial = trainable_arrays(encoder, trainable)
    offset, optimizer_state = 0, {}
    if resume:
        latest = state.check_resumable(config)
        initial = {k: v.numpy() for k, v in latest["encoder"].items()}
        offset, optimizer_state = int(latest["round"]), latest["server_optimizer"]
        state.drop_metrics_after(offset)
        if offset < config.rounds:
            log.info("resuming after round %d of %d from %s", offset, config.rounds,
                     state.checkpoint_dir)
    if config.rounds - offset <= 0:
        log.warning("the run in %s is already FINISHED: all %d of %d rounds are done, "
                    "nothing to train (give more rounds to extend it)", out_dir, offset,
                    config.rounds)
        return offset
    meta_optimizer = MetaOptimizer(config.server, initial)
    meta_optimizer.load_state_dict(optimizer_state)
    recorder = RunRecorder(state, config, meta_optimizer, prior)
    strategy = MetaStrategy(
        meta_optimizer=meta_optimizer,
        layout=trainable_layout(encoder, trainable),
        min_sites=config.min_sites,
        round_offset=offset,
        recorder=recorder,
        fraction_train=config.server.fraction_train,
        fraction_evaluate=config.server.fraction_evaluate,
        evaluate_every=config.server.evaluate_every,
        # One message per site per round: validation rides on the next round's train
        # messages, unless SecAgg+ carries them or another sample is to be evaluated.
        validate_in_train=config.server.secure_aggregation is None
        and config.server.fraction_evaluate == config.server.fraction_train,
        last_round=config.rounds,
        # A resumed run scores the encoder it resumes from, unless that was done.
        score_resumed=not any(r.get("phase") == "evaluate" and r.get("round") == offset
                              for r in state.read_metrics()),
        max_failed_rounds=config.server.max_failed_rounds,
        wait_for_sites=config.sites_to_wait_for,
    )
    strategy.sites.register(registered or {})
    try:
        with progress_bar("rounds", config.rounds, completed=offset) as bar:
            recorder.bar = bar
            _run_rounds(grid, strategy, config, initial, prior)
    except RoundsFailedError as exc:
        log.error("the run FAILED: %s", exc)
        recorder.progress("failed", round=strategy.next_round, reason=str(exc))
        announce_end(grid, strategy, finished=False, reason=str(exc))
        raise
    finally:
        recorder.tracker.close()
        records = state.read_metrics()
        write_rounds_csv(records, out_dir / "rounds.csv")
        write_plots(records, out_dir)
    recorder.progress("finished", round=config.rounds)
    log.info("the run is finished: %d rounds; checkpoints in %s", config.rounds,
             state.checkpoint_dir)
    announce_end(grid, strategy, finished=True, reason="")
    return config.rounds


def _run_rounds(grid: Grid, strategy: MetaStrategy, config: RunConfig,
                initial: dict[str, np.ndarray], prior: str) -> None:
    """The remaining rounds, on the plain or the secure round driver."""
    settings = settings_record(config, prior)
    if config.server.secure_aggregation is not None:
        from server.secure import run_secure_rounds

        log.info("secure aggregation (SecAgg+) is on: the server sees only the sum of the "
                 "site updates")
        run_secure_rounds(grid, strategy, config.server.secure_aggregation, initial=initial,
                          rounds=config.rounds - strategy.rounds_done, settings=settings,
                          fraction_train=config.server.fraction_train,
                          round_timeout=config.server.round_timeout)
        return
    current = initial
    # Flower's loop runs a fixed number of rounds; a failed round does not count, so the
    # loop is started again for the rounds still to do.
    while strategy.rounds_done < config.rounds:
        strategy.start(grid=grid, initial_arrays=numpy_to_arrays(current),
                       num_rounds=config.rounds - strategy.rounds_done,
                       timeout=config.server.round_timeout, train_config=settings,
                       evaluate_config=ConfigRecord(dict(settings)))
        current = strategy.current


def announce_end(grid: Grid, strategy: MetaStrategy, *, finished: bool, reason: str,
                 timeout: float = 30.0) -> None:
    """Tell every connected site that the run ended (and how), so its log says so."""
    try:
        nodes = list(grid.get_node_ids())
        messages = [Message(RecordDict({"event": ConfigRecord({
            "event": "run-finished" if finished else "run-failed",
            "rounds-done": strategy.rounds_done, "reason": reason[:500],
            **strategy.sites.feedback(node, again=True)})}), dst_node_id=node,
            message_type=MessageType.QUERY) for node in nodes]
        grid.send_and_receive(messages, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - a courtesy message; the run is over anyway
        log.warning("could not tell the sites that the run ended: %s", exc)


# --- The ServerApp that `medmeta server start` and `flwr run .` submit -------------------

app = ServerApp()


def rounds_override(context: Context) -> int | None:
    """The run config's ``rounds`` (0: as the config file says)."""
    rounds = int(context.run_config.get("rounds", 0) or 0)
    return rounds if rounds > 0 else None


@app.main()
def production_main(grid: Grid, context: Context) -> None:
    """Run the federation the run config names: ``server-config`` or ``federation``.

    With ``server-config`` (deployment) the operator's state directory is resumed when
    it holds checkpoints, so restarting the server continues where it stopped. Without
    it, the ``federation`` YAML runs in Flower's simulation runtime
    (:func:`server.flwr_simulation.prepare_simulated_federation`).
    """
    log_in_flower_process()
    path = str(context.run_config.get("server-config", ""))
    if not path:
        from server.flwr_simulation import prepare_simulated_federation

        federation, out_dir, resume = prepare_simulated_federation(
            grid, context, rounds=rounds_override(context))
        run_federation(grid, federation, out_dir, resume=resume)
        log.info("meta-model: %s; adapt a new site with: medmeta adapt --checkpoint %s "
                 "--data DATA --ways N --shots K", RunState(out_dir).checkpoint_dir, out_dir)
        return
    from medmeta_common.config.deploy import load_server_config

    config = load_server_config(path)
    if (rounds := rounds_override(context)) is not None:
        config = replace(config, rounds=rounds)
    state = RunState(Path(config.state_dir))
    from server.prompt_grid import PromptGrid

    # Flower's deployment grid polls for replies every 3 s; ours answers within 0.1-1 s.
    run_federation(PromptGrid(grid), config, state.out_dir, resume=bool(state.checkpoints()),
                   registered=state.registered_sites())
