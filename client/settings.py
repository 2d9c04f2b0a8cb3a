"""What a site decides for itself, and what the server asks of each round.

:class:`SiteRuntime` never leaves the site (its data path, state directory, privacy
budget, device). :class:`RoundSettings` is rebuilt, field by field, from the flat
typed entries of the server's message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmeta_common.config import (
    DataConfig,
    FewShotConfig,
    ImageConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
)
from medmeta_common.config.tasks import DEFAULT_TILE
from medmeta_common.models.prior import PRIORS_DIR
from medmeta_common.protocol import VALIDATE_ROUND, rebuild
from medmeta_common.update_codec import ENCODINGS


@dataclass(frozen=True)
class SiteRuntime:
    """Everything a site decides for itself."""

    name: str
    data: DataConfig
    state_dir: Path
    privacy: PrivacyConfig
    val_fraction: float = 0.2
    device: str = "auto"
    amp: bool = True
    threads: int = 1
    cache_data: bool = True
    task: str = "classification"
    tile: int = DEFAULT_TILE
    # Where the site looks for file priors by hash (default: its state directory's).
    prior_folders: tuple[Path, ...] = ()

    @property
    def priors(self) -> tuple[Path, ...]:
        """The folders searched for a file prior, the state directory's last."""
        return (*self.prior_folders, self.state_dir / PRIORS_DIR)


@dataclass(frozen=True)
class RoundSettings:
    """What the server asks of this round, rebuilt and validated from its message."""

    image: ImageConfig
    model: ModelConfig
    train: TrainConfig
    evaluation: FewShotConfig
    planned_rounds: int
    server_round: int
    seed: int
    update_encoding: str = "float32"
    spare_rounds: int = 0
    previous_round: int = 0
    previous_verdict: str = ""
    prior_sha256: str = "none"
    # The round whose global encoder this message carries, when the server asks for its
    # validation metric in the train reply (0: not asked).
    validate_round: int = 0


def read_settings(config: Mapping[str, Any]) -> RoundSettings:
    """Rebuild the round's settings from the server's flat config entries."""
    return RoundSettings(
        image=rebuild(ImageConfig, config, "image"),
        model=rebuild(ModelConfig, config, "model"),
        train=rebuild(TrainConfig, config, "train"),
        evaluation=rebuild(FewShotConfig, config, "evaluation"),
        planned_rounds=int(config.get("planned-rounds", 1)),
        server_round=int(config.get("server-round", 0)),
        seed=int(config.get("seed", 0)),
        update_encoding=_update_encoding(config),
        spare_rounds=max(0, int(config.get("spare-rounds", 0))),
        previous_round=int(config.get("previous-round", 0)),
        previous_verdict=str(config.get("previous-verdict", ""))[:200],
        prior_sha256=str(config.get("prior-sha256", "none")),
        validate_round=max(0, int(config.get(VALIDATE_ROUND, 0))),
    )


def _update_encoding(config: Mapping[str, Any]) -> str:
    encoding = str(config.get("update-encoding", "float32"))
    if encoding not in ENCODINGS:
        raise ValueError(f"the server asked for update encoding {encoding!r}; this site "
                         f"supports {', '.join(ENCODINGS)}")
    return encoding


def site_seed(name: str, seed: int) -> int:
    """A per-site seed, stable across processes (Python's hash() is not)."""
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
