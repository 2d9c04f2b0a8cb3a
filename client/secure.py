"""The site's side of secure aggregation: Flower's ``secaggplus_mod`` around our handler.

A training message that carries SecAgg+ settings (the server runs
:mod:`server.secure`) goes through Flower's ``secaggplus_mod``, which answers the key
exchange stages itself and, in the masked-upload stage, calls our train handler
through :func:`_legacy_bridge`. The bridge translates Flower's legacy fit format to
our messages and back, and hands the mod the *update* (encoder minus global encoder)
with the record count as its weight; the mod quantises and masks it before anything
leaves the site. Plain training messages pass straight through.

A site that refuses to train (its budget is spent) takes part with weight 0, so the
round's masks still cancel.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)

from client.settings import read_settings
from medmeta_common.models.factory import layout_for
from medmeta_common.protocol import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES
from medmeta_common.wire import arrays_to_numpy, from_legacy_config, numpy_to_arrays

log = logging.getLogger(__name__)


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable
                           ) -> Message:
    """Route SecAgg+ training messages through Flower's mod; pass the rest through."""
    if msg.metadata.message_type != MessageType.TRAIN or \
            RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)

    def bridge(inner: Message, context: Context) -> Message:
        return _legacy_bridge(inner, context, call_next)

    return secaggplus_mod(msg, ctxt, bridge)


def _legacy_bridge(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Legacy FitIns -> our train message -> our reply -> legacy FitRes holding the update."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    entries = from_legacy_config(fitins.config)
    settings = read_settings(entries)
    layout = layout_for(settings.model, settings.image, settings.train.trainable)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if [a.shape for a in arrays] != [shape for shape, _ in layout.values()]:
        raise ValueError("the server sent a secure-aggregation round whose encoder does not "
                         "match the model in its settings")
    global_state = dict(zip(layout, arrays, strict=True))
    protocol_state: Mapping[str, Any] = ctxt.state.config_records.get(RECORD_KEY_STATE) or {}
    clipping_range = float(protocol_state.get("clipping_range", np.inf))
    msg.content = RecordDict({ARRAYS_KEY: numpy_to_arrays(global_state),
                              CONFIG_KEY: ConfigRecord(entries)})
    reply = call_next(msg, ctxt)
    if reply.has_error():
        raise RuntimeError(f"local training failed: {reply.error.reason}")
    metrics = dict(reply.content.metric_records[METRICS_KEY])
    if ARRAYS_KEY in reply.content.array_records:
        trained = arrays_to_numpy(reply.content.array_records[ARRAYS_KEY])
        update = [(trained[k].astype(np.float64) - global_state[k]).astype(np.float32)
                  for k in layout]
        weight = int(metrics[NUM_EXAMPLES])  # type: ignore[arg-type]  # a scalar metric
        max_weight = float(protocol_state.get("max_weight", np.inf))
        if weight > max_weight:
            raise ValueError(f"this site trained on {weight} records, more than "
                             f"server.secure_aggregation.max_weight = {max_weight:g}; the "
                             f"operator must raise it for this site to take part")
        _warn_if_clipped(update, clipping_range)
    else:  # refused: take part with weight 0 so that the pairwise masks still cancel
        update = [np.zeros(shape, dtype=np.float32) for shape, _ in layout.values()]
        weight = 0
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(update),
                    num_examples=weight, metrics=cast(dict[str, Any], metrics))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _warn_if_clipped(update: list[np.ndarray], clipping_range: float) -> None:
    largest = max(float(np.abs(u).max()) for u in update)
    if largest > clipping_range:
        log.warning("this round's update has a coordinate of size %.3g, beyond the secure "
                    "aggregation clipping range %.3g: it is clipped before masking",
                    largest, clipping_range)
