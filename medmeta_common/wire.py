"""Encoders and settings to and from Flower's records (see :mod:`.protocol` for the rules)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord


def encoder_to_arrays(encoder: torch.nn.Module) -> ArrayRecord:
    """The encoder's parameters as an ArrayRecord (float32, CPU)."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in encoder.state_dict().items()}
    return ArrayRecord(state)


def encoder_to_numpy(encoder: torch.nn.Module) -> dict[str, np.ndarray]:
    """The encoder's parameters as float32 NumPy arrays (CPU), without a record."""
    return {k: v.detach().to("cpu", torch.float32).numpy()
            for k, v in encoder.state_dict().items()}


def arrays_to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord as a torch state dict (for ``load_state_dict``)."""
    return dict(arrays.to_torch_state_dict())


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as a dict of NumPy arrays."""
    return {k: v.numpy() for k, v in arrays.items()}


def numpy_to_arrays(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A dict of NumPy arrays as an ArrayRecord."""
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})


def metric_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    """A MetricRecord of scalar metrics."""
    return MetricRecord(cast(dict[str, Any], dict(metrics)))


# Flower's legacy messages (the SecAgg+ workflow's FitIns) carry scalars only.
_LEGACY_LIST = "list:"


def to_legacy_config(entries: Mapping[str, Any]) -> dict[str, Any]:
    """Flat entries as legacy scalars: a list becomes a marked JSON string."""
    return {k: _LEGACY_LIST + json.dumps(v) if isinstance(v, list) else v
            for k, v in entries.items()}


def from_legacy_config(entries: Mapping[str, Any]) -> dict[str, Any]:
    """The flat entries :func:`to_legacy_config` encoded."""
    return {k: json.loads(v[len(_LEGACY_LIST):])
            if isinstance(v, str) and v.startswith(_LEGACY_LIST) else v
            for k, v in entries.items()}


def to_config_record(entries: Mapping[str, Any]) -> ConfigRecord:
    """A ConfigRecord of flat entries (ints, floats, strings, bools and lists of them)."""
    return ConfigRecord(dict(entries))
