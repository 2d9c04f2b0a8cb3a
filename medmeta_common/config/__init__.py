"""Typed configuration: the YAML schema of medmeta, as frozen dataclasses, one module a section.

Every field has a type and (where sensible) a default, on the field itself; unknown
keys, wrong types and out-of-range values are errors that name the file, the field
path, what was expected and what was found (:mod:`.typed`). A federation's settings
are :class:`FederationConfig` (:func:`load_config`); the operator's ``server.yaml``
and a hospital's ``site.yaml`` are in :mod:`.deploy`. What a resumed run must match
is in :mod:`.fingerprint`; which fields each task honours in :mod:`.tasks`.
"""

from medmeta_common.config.data import (
    SYNTHETIC_PREFIX,
    DataConfig,
    PartitionConfig,
    resolve_path,
    with_resolved_path,
)
from medmeta_common.config.federation import (
    FederationConfig,
    HeldOutConfig,
    MethodConfig,
    RuntimeConfig,
    SiteConfig,
    load_config,
)
from medmeta_common.config.fewshot import FewShotConfig
from medmeta_common.config.image import ImageConfig
from medmeta_common.config.model import ModelConfig
from medmeta_common.config.privacy import PrivacyConfig
from medmeta_common.config.server import (
    CentralDPConfig,
    MetaUpdateConfig,
    SecureAggregationConfig,
)
from medmeta_common.config.train import TrainConfig
from medmeta_common.errors import ConfigError

__all__ = [
    "SYNTHETIC_PREFIX",
    "CentralDPConfig",
    "ConfigError",
    "DataConfig",
    "FederationConfig",
    "FewShotConfig",
    "HeldOutConfig",
    "ImageConfig",
    "MetaUpdateConfig",
    "MethodConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RuntimeConfig",
    "SecureAggregationConfig",
    "SiteConfig",
    "TrainConfig",
    "load_config",
    "resolve_path",
    "with_resolved_path",
]
