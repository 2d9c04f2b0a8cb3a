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


# Arrays travel packed: one flat array per dtype plus a small index, not one Array per
# tensor. Flower moves every Array (and each of its chunks) as its own object, one
# HTTP request each, two at a time: Lite0's 98 FiLM tensors were 197 objects, ~10 s
# per message each way on the 2-core box; packed they are 5.
PACKED_INDEX = "packed-index"
PACKED_DATA = "packed-data:"
PACKABLE_KINDS = "fiub"  # floats, signed and unsigned integers, booleans


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The dict of NumPy arrays an ArrayRecord holds (packed by :func:`numpy_to_arrays`).

    A record that is not in the packed form is read entry by entry. A packed record
    that does not add up (a hostile or broken peer) raises ``ValueError`` saying why;
    the receiver's layout check (:func:`.protocol.check_update`) judges the rest.
    """
    raw = {k: v.numpy() for k, v in arrays.items()}
    if PACKED_INDEX not in raw:
        return raw
    try:
        index = json.loads(raw.pop(PACKED_INDEX).tobytes().decode("utf-8"))
        entries = [(str(name), np.dtype(dtype), tuple(int(n) for n in shape))
                   for name, dtype, shape in index]
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable packed-array index ({exc})") from None
    unpacked: dict[str, np.ndarray] = {}
    offsets: dict[str, int] = {}
    for name, dtype, shape in entries:
        key = PACKED_DATA + dtype.name
        if dtype.kind not in PACKABLE_KINDS or key not in raw or name in unpacked \
                or any(n < 0 for n in shape):
            raise ValueError(f"bad packed-array entry {name!r} ({dtype.name}, {shape})")
        start, size = offsets.get(key, 0), int(np.prod(shape, dtype=np.int64))
        flat = raw[key]
        if flat.dtype != dtype or start + size > flat.size:
            raise ValueError(f"packed {dtype.name} data too short for {name!r}")
        unpacked[name] = flat[start:start + size].reshape(shape)
        offsets[key] = start + size
    leftover = sorted(set(raw) - set(offsets)) + sorted(
        k for k, used in offsets.items() if used != raw[k].size)
    if leftover:
        raise ValueError(f"packed arrays hold data no index entry names: {leftover}")
    return unpacked


def numpy_to_arrays(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """A dict of NumPy arrays as a packed ArrayRecord (see :data:`PACKED_INDEX`)."""
    names = sorted(state)
    groups: dict[str, list[np.ndarray]] = {}
    for name in names:
        groups.setdefault(np.asarray(state[name]).dtype.name, []).append(
            np.ascontiguousarray(state[name]).reshape(-1))
    index = [[name, np.asarray(state[name]).dtype.name, list(np.shape(state[name]))]
             for name in names]
    record = {PACKED_INDEX: torch.from_numpy(
        np.frombuffer(json.dumps(index).encode("utf-8"), dtype=np.uint8).copy())}
    for dtype, parts in groups.items():
        record[PACKED_DATA + dtype] = torch.from_numpy(np.concatenate(parts))
    return ArrayRecord(record)


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
