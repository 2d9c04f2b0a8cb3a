"""The site client: a Flower ClientApp with ``train``, ``evaluate`` and ``query`` handlers.

The work of a round is in :mod:`client.round`; this module turns Flower messages into
calls to it and its results into replies.

What a site sends back, and nothing else:

- ``train``: the encoder's arrays, the number of training records, and the scalar
  metrics in :data:`medmeta_common.protocol.TRAIN_METRICS` (ε spent, δ, steps, noise,
  sampling rate; the training loss only when DP is off). A site whose budget would be
  exceeded sends no arrays and ``refused = 1``. When the server asks (config entry
  ``validate-round``), the site first scores the encoder it received — the previous
  round's global encoder — as an evaluate message would, and adds that record
  (:data:`~medmeta_common.protocol.VALIDATION_KEY`, the evaluate metrics): a round
  then needs one message per site instead of two.
- ``evaluate``: the task's few-shot validation metric on the site's validation split
  and its size (the run's final round, and secure-aggregation runs).
- ``query``: the site's name, so the operator's logs and reports can name sites
  (a query that announces the end of the run is logged, and answered the same way).

Each message's start-up (process spawn to handler ready) and compute are timed and
kept at the site (:mod:`client.startup`). Each message's handler logs one timestamped
line at the site (the round, what the server did with the site's previous update, ε
spent of the budget), which reaches the site's terminal through its SuperNode
(:mod:`client.site_log`).

The ClientApp finds its site from the SuperNode's node config (``site-config``, a
deployed hospital) or, in Flower's simulation runtime, from the node's
``partition-id`` and the run config's federation (:mod:`client.simulated`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.prior import round_encoder
from client.round import evaluate_round, prepare_round, train_round
from client.secure import secure_aggregation_mod
from client.settings import RoundSettings, SiteRuntime, read_settings
from client.site_log import log_end_of_run, log_previous_verdict, log_trained
from client.startup import MessageClock
from medmeta_common.app_logging import log_in_flower_process
from medmeta_common.models.encoder import SharedEncoder
from medmeta_common.models.factory import load_trainable, trainable_arrays, trainable_layout
from medmeta_common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    VALIDATION_KEY,
    check_update,
)
from medmeta_common.update_codec import encode_update
from medmeta_common.wire import arrays_to_numpy, metric_record, numpy_to_arrays

log = logging.getLogger(__name__)

SiteResolver = Callable[[Context], SiteRuntime]


def _global_encoder(msg: Message, settings: RoundSettings, site: SiteRuntime) -> SharedEncoder:
    """The global encoder: this site's prior with the trainable set the server sent."""
    encoder = round_encoder(settings, site)
    try:
        arrays = arrays_to_numpy(msg.content.array_records[ARRAYS_KEY])
    except ValueError as exc:
        raise ValueError(f"the server sent a malformed encoder: {exc}") from None
    problem = check_update(arrays, trainable_layout(encoder, settings.train.trainable))
    if problem:
        raise ValueError(f"the server sent a malformed encoder: {problem}")
    load_trainable(encoder, arrays)
    return encoder


def handle_train(msg: Message, site: SiteRuntime) -> Message:
    """One round of local training; see the module docstring for what is returned."""
    clock = MessageClock("train")
    settings = read_settings(msg.content.config_records[CONFIG_KEY])
    log_previous_verdict(site, settings)
    encoder = _global_encoder(msg, settings, site)
    prepare_round(site, settings, train=True)
    clock.ready()
    validation = _validation(site, settings, encoder) if settings.validate_round else None
    outcome = train_round(site, settings, encoder)
    if "compute-seconds" in outcome.metrics:  # validation and training, not start-up
        outcome.metrics["compute-seconds"] = round(clock.compute_seconds, 3)
    clock.record(site.state_dir, settings.server_round)
    log_trained(site, settings, outcome.metrics)
    records = RecordDict({METRICS_KEY: metric_record(outcome.metrics)})
    if validation is not None:
        records[VALIDATION_KEY] = metric_record(validation)
    if outcome.encoder is not None:
        trained = trainable_arrays(outcome.encoder, settings.train.trainable)
        if settings.update_encoding == "float32":
            records[ARRAYS_KEY] = numpy_to_arrays(trained)
        else:  # a float16 or int8 delta against the encoder the server sent
            base = arrays_to_numpy(msg.content.array_records[ARRAYS_KEY])
            records[ARRAYS_KEY] = numpy_to_arrays(encode_update(trained, base,
                                                                settings.update_encoding))
    return Message(records, reply_to=msg)


def _validation(site: SiteRuntime, settings: RoundSettings,
                encoder: SharedEncoder) -> dict[str, float | int] | None:
    """The received encoder's validation metric, scored before training changes it.

    A failure is logged and leaves the record out: it must not cost the round's update.
    """
    try:
        return evaluate_round(site, settings, encoder)
    except Exception:  # the training below is what the round needs
        log.exception("site %s: validation of round %d's encoder failed; training goes on",
                      site.name, settings.validate_round)
        return None


def handle_evaluate(msg: Message, site: SiteRuntime) -> Message:
    """Few-shot accuracy of the global encoder on this site's validation split."""
    clock = MessageClock("evaluate")
    settings = read_settings(msg.content.config_records[CONFIG_KEY])
    log_previous_verdict(site, settings)
    encoder = _global_encoder(msg, settings, site)
    prepare_round(site, settings, train=False)
    clock.ready()
    metrics = evaluate_round(site, settings, encoder)
    clock.record(site.state_dir, settings.server_round)
    return Message(RecordDict({METRICS_KEY: metric_record(metrics)}), reply_to=msg)


def handle_query(msg: Message, site: SiteRuntime) -> Message:
    """The site's name (operator-assigned metadata, not data)."""
    event = msg.content.config_records.get("event")
    if event is not None:
        log_end_of_run(site, event)
    return Message(RecordDict({"site": ConfigRecord({"name": site.name})}), reply_to=msg)


def make_client_app(resolve: SiteResolver) -> ClientApp:
    """A ClientApp whose site settings come from ``resolve(context)``."""
    app = ClientApp()

    @app.train(mods=[secure_aggregation_mod])
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, resolve(context))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, resolve(context))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, resolve(context))

    return app



# --- Production: the ClientApp each hospital's SuperNode runs ---------------------------


def site_from_node_config(context: Context) -> SiteRuntime:
    """The site of this node: its ``site.yaml``, or (simulation) its federation's site."""
    log_in_flower_process()
    path = str(context.node_config.get("site-config", ""))
    if not path and "partition-id" in context.node_config:
        from client.simulated import site_from_run_config

        return site_from_run_config(context)
    if not path:
        raise ValueError("the SuperNode has no 'site-config' in its node config; start it with "
                         "`medmeta site start --config site.yaml`")
    return _site_runtime(path, Path(path).stat().st_mtime)


@functools.lru_cache(maxsize=8)
def _site_runtime(path: str, mtime: float) -> SiteRuntime:
    from medmeta_common.config.deploy import load_site_config

    config = load_site_config(path)
    return SiteRuntime(name=config.name, data=config.data, state_dir=Path(config.state_dir),
                       privacy=config.privacy, val_fraction=config.val_fraction,
                       device=config.runtime.device, amp=config.runtime.amp,
                       threads=max(1, int(config.runtime.cpus_per_site)),
                       cache_data=config.cache_data, task=config.task, tile=config.tile,
                       prior_folders=tuple(Path(p) for p in config.priors))


app = make_client_app(site_from_node_config)
