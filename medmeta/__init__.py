"""medmeta: federated meta-learning for hospitals.

This package is the one place that sees both sides: the ``medmeta`` command and the
notebook API (:mod:`medmeta.api`). The operator's code lives in ``server``, the
hospital's in ``client``, and what both share in ``medmeta_common``.
"""

from typing import Any

__version__ = "0.1.0"

_API = ("load", "load_classifier", "MetaLearner", "Classifier")


def __getattr__(name: str) -> Any:
    # The API pulls in torch and MONAI; load it on first use so the CLI starts fast.
    if name in _API:
        from medmeta import api

        return getattr(api, name)
    raise AttributeError(f"module 'medmeta' has no attribute {name!r}")
