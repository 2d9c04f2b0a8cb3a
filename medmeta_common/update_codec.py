"""Lean site updates: what a site sends as ``float32`` weights, ``float16`` or ``int8`` deltas.

``float32`` (the default) sends the trained encoder as it is. The lean encodings send
the *update* ``delta = trained - global`` instead, which is small and centred on zero,
so that few bits lose little:

- ``float16``: the delta in half precision (0.5x the bytes);
- ``int8``: per tensor, ``delta ~= scale * q`` with ``q`` in ``[-127, 127]`` and
  ``scale = max|delta| / 127`` sent beside it as ``<name>:scale`` (about 0.25x the
  bytes). Rounding is stochastic (``floor(delta / scale + u)``, ``u ~ U[0, 1)``), so the
  decoded delta is unbiased and the errors of different sites average out.

The server adds the decoded delta to the global encoder it sent and screens the result
like any update. Encoding happens after DP training, on the privatised encoder: it is
post-processing and changes no privacy guarantee. This module needs no Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import numpy as np

Encoding = Literal["float32", "float16", "int8"]  # also the type of server.update_encoding
ENCODINGS: tuple[str, ...] = get_args(Encoding)
SCALE_SUFFIX = ":scale"
_INT8_LEVELS = 127

Arrays = Mapping[str, np.ndarray]
Layout = Mapping[str, tuple[tuple[int, ...], str]]


def encode_update(trained: Arrays, base: Arrays, encoding: str,
                  rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """What a site sends for its ``trained`` encoder, given the ``base`` it started from."""
    if encoding == "float32":
        return {k: np.asarray(v, dtype=np.float32) for k, v in trained.items()}
    deltas = {k: np.asarray(trained[k], np.float32) - np.asarray(base[k], np.float32)
              for k in trained}
    if encoding == "float16":
        with np.errstate(over="ignore"):  # an overflow becomes inf, which the server rejects
            return {k: d.astype(np.float16) for k, d in deltas.items()}
    if encoding != "int8":
        raise ValueError(f"unknown update encoding {encoding!r}; expected one of {ENCODINGS}")
    rng = rng if rng is not None else np.random.default_rng()
    sent: dict[str, np.ndarray] = {}
    for name, delta in deltas.items():
        peak = float(np.abs(delta).max(initial=0.0))
        scale = peak / _INT8_LEVELS if peak > 0 else 1.0
        q = np.floor(delta / scale + rng.random(delta.shape, dtype=np.float32))
        sent[name] = np.clip(q, -_INT8_LEVELS, _INT8_LEVELS).astype(np.int8)
        sent[name + SCALE_SUFFIX] = np.array([scale], dtype=np.float32)
    return sent


def encoded_layout(layout: Layout, encoding: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The ``name -> (shape, dtype)`` a well-formed update has under ``encoding``."""
    if encoding == "float32":
        return dict(layout)
    if encoding == "float16":
        return {k: (shape, "float16") for k, (shape, _) in layout.items()}
    expected: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, _) in layout.items():
        expected[name] = (shape, "int8")
        expected[name + SCALE_SUFFIX] = ((1,), "float32")
    return expected


def decode_update(sent: Arrays, base: Arrays, encoding: str) -> dict[str, np.ndarray]:
    """The site's encoder in float32, from what it sent (already checked for its layout)."""
    if encoding == "float32":
        return {k: np.asarray(v, dtype=np.float32) for k, v in sent.items()}
    decoded = {}
    for name, value in base.items():
        delta = np.asarray(sent[name], dtype=np.float32)
        if encoding == "int8":
            delta = delta * np.float32(sent[name + SCALE_SUFFIX][0])
        decoded[name] = (np.asarray(value, dtype=np.float32) + delta).astype(np.float32)
    return decoded


def payload_bytes(arrays: Arrays) -> int:
    """Bytes of array data in an update (what dominates the message)."""
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))
