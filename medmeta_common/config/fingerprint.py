"""Fingerprints of configurations: what a resumed run must match.

Every checkpoint carries the fingerprint of the configuration that made it (and the
schema it was computed with); a resumed run must present the same fingerprint, so it
continues the same method (only the round count may change).

Schema 2 (``SCHEMA_VERSION``): the SHA-256 of the configuration's *canonical form*,
in which every field that holds its declared default is left out, recursively. A
field added later with a default therefore leaves the fingerprint of every older
configuration unchanged, with no list of "later defaults" to maintain. Changing what
an existing default *means* is a schema change: bump ``SCHEMA_VERSION`` and keep the
old rule here, as schema 1 is kept.

Schema 1 (checkpoints without a schema number, written by medmeta 0.1 before this
rule): the fingerprint of ``dataclasses.asdict`` of the configuration of that time,
less a fixed set of settings added while it was in use. :func:`legacy_fingerprint`
recomputes it from a configuration of today through :func:`v1_view`, so operators
can restart servers and researchers resume runs across the upgrade. It is frozen:
nothing added after schema 1 is ever listed here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

SCHEMA_VERSION = 2


def _is_default(item: dataclasses.Field, value: Any) -> bool:
    if item.default is not dataclasses.MISSING:
        return bool(value == item.default)
    if item.default_factory is not dataclasses.MISSING:
        return bool(value == item.default_factory())
    return False


def canonical(value: Any) -> Any:
    """``value`` as plain data with every field at its default left out (recursively)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: canonical(getattr(value, item.name))
                for item in dataclasses.fields(value)
                if not _is_default(item, getattr(value, item.name))}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def fingerprint(sections: dict[str, Any]) -> str:
    """The schema-2 fingerprint of named configuration sections (16 hex digits)."""
    data = {"schema": SCHEMA_VERSION, **{k: canonical(v) for k, v in sections.items()}}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- Schema 1, frozen -------------------------------------------------------------------

# The fields each config dataclass had under schema 1.
_V1_FIELDS: dict[str, tuple[str, ...]] = {
    "FederationConfig": ("name", "description", "seed", "rounds", "image", "model", "train",
                         "server", "evaluation", "sites", "kind", "privacy", "held_out",
                         "runtime"),
    "ServerConfig": ("name", "description", "seed", "rounds", "image", "model", "train",
                     "server", "evaluation"),
    "SiteConfig": ("name", "data", "val_fraction", "privacy", "task", "tile"),
    "DataConfig": ("path", "split", "classes", "group_key", "partition", "policy", "frames",
                   "manifest", "split_seed"),
    "PartitionConfig": ("parts", "index", "seed"),
    "PrivacyConfig": ("enabled", "epsilon", "delta", "max_grad_norm", "noise_multiplier",
                      "unit"),
    "HeldOutConfig": ("name", "data", "fewshot"),
    "FewShotConfig": ("ways", "shots", "queries", "episodes", "finetune_steps"),
    "ImageConfig": ("size", "channels", "intensity"),
    "ModelConfig": ("preset", "widths", "convs_per_stage", "norm_groups",
                    "weight_standardization", "cosine_scale"),
    "TrainConfig": ("loss", "local_steps", "batch_size", "ways", "lr", "momentum", "augment",
                    "augment_multiplicity", "head", "rotation_weight", "shots", "queries"),
    "MetaUpdateConfig": ("meta_lr", "optimizer", "momentum", "beta2", "fraction_train",
                         "fraction_evaluate", "evaluate_every", "min_sites", "round_timeout",
                         "aggregator", "trim_fraction", "max_faulty", "max_update_norm",
                         "central_dp", "secure_aggregation", "update_encoding"),
    "CentralDPConfig": ("clip", "noise_multiplier", "delta"),
    "SecureAggregationConfig": ("num_shares", "reconstruction_threshold", "clipping_range",
                                "quantization_range", "max_weight", "timeout"),
    "RuntimeConfig": ("device", "amp", "cpus_per_site"),
}

# Schema-1 values of fields whose representation changed since (schema 2 writes
# ``None`` for "the task's default", schema 1 wrote the value).
_V1_VALUES: dict[tuple[str, str], dict[Any, Any]] = {
    ("DataConfig", "frames"): {None: "middle"},
}

# Schema-1 fields that were renamed since: (dataclass, old name) -> today's name.
_V1_RENAMED: dict[tuple[str, str], str] = {("ModelConfig", "preset"): "backbone"}

# Schema 1 left these settings out while they held these defaults (they were added
# while schema-1 runs were being made).
_V1_LATER_SERVER = {"aggregator": "mean", "trim_fraction": 0.2, "max_faulty": 1,
                    "max_update_norm": None, "central_dp": None, "secure_aggregation": None,
                    "update_encoding": "float32", "evaluate_every": 1}
_V1_LATER_SITE = {"task": "classification", "tile": 128}


def v1_view(value: Any) -> Any:
    """``value`` as schema 1's ``asdict`` would have written it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        kind = type(value).__name__
        names = _V1_FIELDS.get(kind, tuple(f.name for f in dataclasses.fields(value)))
        out = {}
        for name in names:
            item = getattr(value, _V1_RENAMED.get((kind, name), name))
            if (kind, name) in _V1_VALUES:
                item = _V1_VALUES[(kind, name)].get(item, item)
            out[name] = v1_view(item)
        return out
    if isinstance(value, list | tuple):
        return [v1_view(v) for v in value]
    return value


def legacy_fingerprint(data: dict[str, Any]) -> str:
    """The schema-1 fingerprint of a :func:`v1_view` (less the excluded sections)."""
    if isinstance(data.get("sites"), list):
        data = {**data, "sites": [{k: v for k, v in site.items()
                                   if k not in _V1_LATER_SITE or v != _V1_LATER_SITE[k]}
                                  for site in data["sites"]]}
    server = data.get("server")
    if isinstance(server, dict):
        data = {**data, "server": {k: v for k, v in server.items()
                                   if k not in _V1_LATER_SERVER or v != _V1_LATER_SERVER[k]}}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
