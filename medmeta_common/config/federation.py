"""A simulated federation (``kind: federation``): its sites, the method and the held-out site.

Load with :func:`load_config`. Relative paths in a file are resolved against the
file's own folder, so a config works from any working directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from medmeta_common.config.data import DataConfig, resolve_path, with_resolved_path
from medmeta_common.config.fewshot import FewShotConfig
from medmeta_common.config.fingerprint import fingerprint, legacy_fingerprint, v1_view
from medmeta_common.config.image import ImageConfig
from medmeta_common.config.model import ModelConfig
from medmeta_common.config.privacy import PrivacyConfig
from medmeta_common.config.server import MetaUpdateConfig
from medmeta_common.config.tasks import DEFAULT_TILE, TaskName, check_task_fields
from medmeta_common.config.train import TrainConfig
from medmeta_common.config.typed import build, check, load_yaml_mapping

# The sections a resumed run must match (the round count may change; descriptions too).
METHOD_SECTIONS = ("name", "seed", "image", "model", "train", "server", "evaluation")


@dataclass(frozen=True)
class SiteConfig:
    """One hospital of a simulated federation.

    ``task: segmentation`` sites read image/mask pairs (``data.path`` a folder, see
    :mod:`medmeta_common.data.segmentation`; large images cut into ``tile`` pixel
    tiles) and train the shared encoder through a site-local decoder. Data fields a
    task cannot honour are refused (:mod:`medmeta_common.config.tasks`).
    """

    name: str
    data: DataConfig
    val_fraction: float = 0.2
    privacy: PrivacyConfig | None = None
    task: TaskName = "classification"
    tile: int = DEFAULT_TILE

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name and not self.name.startswith("."),
              field="name", expected="a site name without '/'", found=self.name)
        check(0 < self.val_fraction < 0.9, field="val_fraction", expected="a number in (0, 0.9)",
              found=self.val_fraction)
        check(16 <= self.tile <= 4096, field="tile", expected="an integer in [16, 4096]",
              found=self.tile)
        check_task_fields(self.task, self.data, self.tile)


@dataclass(frozen=True)
class HeldOutConfig:
    """The new site that adapts the meta-model after the federation (never trains in it)."""

    name: str
    data: DataConfig
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where site training runs."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    cpus_per_site: float = 1.0
    # A deployed site starts the next message's process while it is idle, and that
    # process loads torch (and Opacus, MONAI as the site needs) before its task comes.
    prestart_runner: bool = True

    def __post_init__(self) -> None:
        check(self.cpus_per_site > 0, field="cpus_per_site", expected="a positive number",
              found=self.cpus_per_site)


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """The meta-learning run the server coordinates: what every site is asked to do.

    Shared by a simulated federation (:class:`FederationConfig`) and the operator's
    production server (``kind: server``).
    """

    name: str = "federation"
    description: str = ""
    seed: int = 0
    rounds: int = 10
    image: ImageConfig = field(default_factory=ImageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: MetaUpdateConfig = field(default_factory=MetaUpdateConfig)
    evaluation: FewShotConfig = field(default_factory=FewShotConfig)

    def __post_init__(self) -> None:
        check(self.rounds >= 1, field="rounds", expected="at least 1", found=self.rounds)
        lite = self.model.backbone == "efficientnet_lite0"
        check(lite or self.train.trainable == "all", field="train.trainable",
              expected="'all' with a small/large backbone (FiLM needs EfficientNet-Lite0's "
              "BatchNorm layers)", found=self.train.trainable)
        if lite:
            # The prior was trained on RGB images scaled to [0, 1] (then to [-1, 1]).
            check(self.image.channels == 3, field="image.channels",
                  expected="3 with backbone efficientnet_lite0 (grey images are converted)",
                  found=self.image.channels)
            check(self.image.intensity == "minmax", field="image.intensity",
                  expected="'minmax' with backbone efficientnet_lite0 (the inputs its prior "
                  "was trained on)", found=self.image.intensity)

    @property
    def min_sites(self) -> int:
        """Fewest accepted updates per round (default 2)."""
        return self.server.min_sites or 2

    @property
    def sites_to_wait_for(self) -> int:
        """Connected sites a round waits for (``server.wait_for_sites``, at least min_sites)."""
        return max(self.min_sites, self.server.wait_for_sites or 0)

    def method_hash(self) -> str:
        """Fingerprint of the method (round count excluded, so a run can be extended)."""
        return fingerprint({k: getattr(self, k) for k in METHOD_SECTIONS})

    def legacy_method_hash(self) -> str:
        """The same under schema 1 (checkpoints of medmeta 0.1)."""
        view = v1_view(self)
        return legacy_fingerprint({k: view[k] for k in METHOD_SECTIONS})

    def hash(self) -> str:
        """What a resumed run must match (see :mod:`medmeta_common.config.fingerprint`)."""
        return self.method_hash()

    def legacy_hash(self) -> str:
        """:meth:`hash` under schema 1."""
        return self.legacy_method_hash()


@dataclass(frozen=True, kw_only=True)
class FederationConfig(MethodConfig):
    """A whole (simulated) federation: sites, method, privacy and the held-out site."""

    sites: tuple[SiteConfig, ...]
    kind: Literal["federation"] = "federation"
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    held_out: HeldOutConfig | None = None
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(len(self.sites) >= 1, field="sites", expected="at least one site",
              found=len(self.sites))
        names = [s.name for s in self.sites]
        duplicate = sorted({n for n in names if names.count(n) > 1})
        check(not duplicate, field="sites", expected="distinct site names", found=duplicate)
        check(self.min_sites <= len(self.sites), field="server.min_sites",
              expected=f"at most the number of sites ({len(self.sites)})",
              found=self.min_sites)
        check(self.sites_to_wait_for <= len(self.sites), field="server.wait_for_sites",
              expected=f"at most the number of sites ({len(self.sites)})",
              found=self.server.wait_for_sites)
        self._check_aggregator()
        if self.train.loss == "protonet":
            privates = [s.name for s in self.sites if self.privacy_of(s).enabled]
            check(not privates, field="train.loss",
                  expected="'cosine' while DP is on (the prototypical loss couples the records "
                  "of an episode, so per-record DP-SGD does not hold for it)",
                  found=f"'protonet' with privacy enabled at {privates}")

    def _check_aggregator(self) -> None:
        """A robust aggregator must be able to act with this many sites."""
        n, server = len(self.sites), self.server
        if server.aggregator == "trimmed_mean":
            check(int(server.trim_fraction * n) >= 1, field="server.trim_fraction",
                  expected=f"at least 1/{n} with {n} sites (below it trimmed_mean cuts "
                  "nothing and is the plain mean)", found=server.trim_fraction)
        if server.aggregator == "multikrum":
            check(n > 2 * server.max_faulty + 2, field="server.max_faulty",
                  expected=f"f with 2 f + 2 < {n} sites (the condition of Multi-Krum, "
                  "Blanchard et al. 2017)", found=server.max_faulty)

    @property
    def min_sites(self) -> int:
        """Fewest accepted updates per round (default: 2, or 1 with a single site)."""
        return self.server.min_sites or min(2, len(self.sites))

    def privacy_of(self, site: SiteConfig) -> PrivacyConfig:
        """The site's own privacy settings, or the federation's default."""
        return site.privacy or self.privacy

    def hash(self) -> str:
        """Fingerprint of everything but the round count and the description."""
        return fingerprint({"federation": replace(self, rounds=1, description="")})

    def legacy_hash(self) -> str:
        """The same under schema 1 (which kept the description)."""
        view = v1_view(self)
        view.pop("rounds")
        return legacy_fingerprint(view)


def load_config(path: Path | str) -> FederationConfig:
    """Load and validate a federation config file (relative paths resolved to the file)."""
    path = Path(path)
    raw = load_yaml_mapping(path)
    config = build(FederationConfig, raw, source=str(path))
    base = path.resolve().parent
    sites = tuple(replace(s, data=with_resolved_path(s.data, base)) for s in config.sites)
    held_out = config.held_out
    if held_out is not None:
        held_out = replace(held_out, data=with_resolved_path(held_out.data, base))
    return replace(config, sites=sites, held_out=held_out, model=with_resolved_weights(
        config.model, base))


def with_resolved_weights(model: ModelConfig, base: Path) -> ModelConfig:
    """``model`` with a file prior's path resolved against ``base`` (the YAML's folder)."""
    if not model.has_file_prior:
        return model
    return replace(model, weights=resolve_path(base, model.weights))
