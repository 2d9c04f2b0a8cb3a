"""The aggregation server: a Flower ServerApp running the meta-learning strategy.

It starts from a fresh encoder (or the newest checkpoint when resuming), runs the
remaining rounds with :class:`server.strategy.MetaStrategy` on Flower's own round
loop, and after every round writes an atomic checkpoint and a metrics line.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from medmeta_common.checkpoint import atomic_write, checkpoint_payload
from medmeta_common.config import MethodConfig
from medmeta_common.errors import FederationError
from medmeta_common.models.factory import build_encoder, trainable_arrays, trainable_layout
from medmeta_common.models.prior import PRIORS_DIR, prior_sha256
from medmeta_common.protocol import flatten
from medmeta_common.wire import numpy_to_arrays, to_config_record
from server.meta_update import MetaOptimizer
from server.plots import write_plots, write_rounds_csv
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
                    "update-encoding": config.server.update_encoding, "prior-sha256": prior})
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


class RunRecorder:
    """Writes the checkpoint and metrics of each round, and logs progress."""

    def __init__(self, state: RunState, config: RunConfig, meta_optimizer: MetaOptimizer,
                 prior: str) -> None:
        self.state = state
        self.config = config
        self.meta_optimizer = meta_optimizer
        self.prior = prior

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
        sites = record["sites"]
        epsilons = [m["epsilon"] for m in sites.values() if isinstance(m.get("epsilon"), float)]
        others = {s: m["status"] for s, m in sites.items() if m["status"] != "accepted"}
        central = record.get("central_epsilon")
        log.info("round %d/%d: %d/%d site update(s) accepted%s%s%s (%.1f s)", round_number,
                 self.config.rounds, record["accepted"], len(sites),
                 f", max epsilon {max(epsilons):.2f}" if epsilons else "",
                 f", site-level (central) epsilon {central:.2f}" if central is not None else "",
                 f", {others}" if others else "", record["seconds"])

    def evaluate_done(self, round_number: int, record: dict[str, Any]) -> None:
        """Append the evaluation line and log the mean accuracy."""
        self.state.append_metrics(record)
        if record["accuracy_mean"] is not None:
            per_site = ", ".join(f"{s} {m['accuracy']:.3f}" for s, m in record["sites"].items()
                                 if "accuracy" in m)
            log.info("round %d/%d: few-shot validation accuracy %.3f (%s)", round_number,
                     self.config.rounds, record["accuracy_mean"], per_site)
        dice = {s: m["dice"] for s, m in record["sites"].items() if "dice" in m}
        if dice:
            log.info("round %d/%d: segmentation validation Dice %s", round_number,
                     self.config.rounds, ", ".join(f"{s} {d:.3f}" for s, d in dice.items()))


def run_federation(grid: Grid, config: RunConfig, out_dir: Path, *, resume: bool) -> int:
    """Run (or resume) the federation on ``grid``; return the last round done."""
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
        log.info("resuming after round %d from %s", offset, state.checkpoint_dir)
    remaining = config.rounds - offset
    if remaining <= 0:
        log.info("all %d rounds are already done; nothing to train", config.rounds)
        return offset
    meta_optimizer = MetaOptimizer(config.server, initial)
    meta_optimizer.load_state_dict(optimizer_state)
    strategy = MetaStrategy(
        meta_optimizer=meta_optimizer,
        layout=trainable_layout(encoder, trainable),
        min_sites=config.min_sites,
        round_offset=offset,
        recorder=RunRecorder(state, config, meta_optimizer, prior),
        fraction_train=config.server.fraction_train,
        fraction_evaluate=config.server.fraction_evaluate,
        evaluate_every=config.server.evaluate_every,
        last_round=config.rounds,
    )
    settings = settings_record(config, prior)
    if config.server.secure_aggregation is not None:
        from server.secure import run_secure_rounds

        log.info("secure aggregation (SecAgg+) is on: the server sees only the sum of the "
                 "site updates")
        run_secure_rounds(grid, strategy, config.server.secure_aggregation, initial=initial,
                          rounds=remaining, settings=settings,
                          fraction_train=config.server.fraction_train,
                          round_timeout=config.server.round_timeout)
    else:
        strategy.start(grid=grid, initial_arrays=numpy_to_arrays(initial),
                       num_rounds=remaining, timeout=config.server.round_timeout,
                       train_config=settings, evaluate_config=ConfigRecord(dict(settings)))
    records = state.read_metrics()
    write_rounds_csv(records, out_dir / "rounds.csv")
    write_plots(records, out_dir)
    return config.rounds


# --- Production: the ServerApp that `medmeta server start` submits to the SuperLink ------

app = ServerApp()


@app.main()
def production_main(grid: Grid, context: Context) -> None:
    """Run the federation of the ``server.yaml`` named in the run config.

    A state directory that already holds checkpoints is resumed (same method only), so
    restarting the server after a crash continues where it stopped.
    """
    from medmeta_common.config.deploy import load_server_config

    path = str(context.run_config.get("server-config", ""))
    if not path:
        raise FederationError("the run config has no 'server-config'; start runs with "
                              "`medmeta server start --config server.yaml`")
    config = load_server_config(path)
    state_dir = Path(config.state_dir)
    run_federation(grid, config, state_dir, resume=bool(RunState(state_dir).checkpoints()))
