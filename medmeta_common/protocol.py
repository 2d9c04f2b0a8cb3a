"""What travels between server and sites: names, allowed contents, and the checks on them.

Only the shared encoder's arrays, the number of training records and scalar metrics
go from a site to the server. Settings go from the server to the sites as flat,
typed entries (``"train.local_steps": 20``) that the site rebuilds into the same
frozen config dataclasses, validated field by field — never pickled, never used to
name a class. This module needs no Flower; :mod:`medmeta_common.wire` converts to
and from Flower's records.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from medmeta_common.config.typed import build

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES = "num-examples"
# A train reply's second metric record: the site's validation metric of the encoder it
# received (the previous round's global encoder), when the server asked for it with
# the config entry ``VALIDATE_ROUND`` (that round's number). It saves a round its
# separate evaluate message (one process start per site when deployed).
VALIDATION_KEY = "validation"
VALIDATE_ROUND = "validate-round"

# The scalar metrics a site may send back, and nothing else.
TRAIN_METRICS = frozenset({
    NUM_EXAMPLES, "epsilon", "delta", "steps", "round-steps", "noise-multiplier",
    "sample-rate", "refused", "train-loss", "dp", "compute-seconds", "epsilon-budget",
})
EVALUATE_METRICS = frozenset({NUM_EXAMPLES, "accuracy", "accuracy-ci95", "episodes", "ways",
                              "dice", "dice-ci95", "map50", "map"})


def layout_of(encoder: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Expected ``name -> (shape, dtype)`` of an encoder update."""
    return {k: (tuple(v.shape), "float32") for k, v in encoder.state_dict().items()}


def check_update(
    arrays: Mapping[str, np.ndarray], layout: Mapping[str, tuple[tuple[int, ...], str]]
) -> str | None:
    """Why an update is malformed (wrong keys, shapes, dtypes, non-finite), or ``None``."""
    missing = sorted(set(layout) - set(arrays))
    extra = sorted(set(arrays) - set(layout))
    if missing or extra:
        return f"unexpected arrays (missing {missing[:3]}, extra {extra[:3]})"
    for name, (shape, dtype) in layout.items():
        value = arrays[name]
        if tuple(value.shape) != shape:
            return f"{name} has shape {tuple(value.shape)}, expected {shape}"
        if str(value.dtype) != dtype:
            return f"{name} has dtype {value.dtype}, expected {dtype}"
        if not np.isfinite(value).all():
            return f"{name} holds NaN or infinite values"
    return None


def flatten(config: Any, prefix: str) -> dict[str, Any]:
    """A config dataclass as flat ``prefix.field`` entries (``None`` fields left out)."""
    flat: dict[str, Any] = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        key = f"{prefix}.{item.name}"
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            flat.update(flatten(value, key))
        elif isinstance(value, tuple):
            flat[key] = list(value)
        else:
            flat[key] = value
    return flat


def unflatten(record: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The nested mapping of the ``prefix.*`` entries of a flat record."""
    nested: dict[str, Any] = {}
    for key, value in record.items():
        if not key.startswith(prefix + "."):
            continue
        *parents, leaf = key[len(prefix) + 1 :].split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if isinstance(value, list) else value
    return nested


def rebuild(cls: type, record: Mapping[str, Any], prefix: str) -> Any:
    """Rebuild and validate config dataclass ``cls`` from a flat record."""
    return build(cls, unflatten(record, prefix), source="message from the server", field=prefix)


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, else ``None``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
