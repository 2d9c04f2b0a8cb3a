"""Typed configuration: the YAML schema of medmeta, as frozen dataclasses.

Load with :func:`load_config`. Every field has a type and (where sensible) a default;
unknown keys, wrong types and out-of-range values are errors that name the file, the
field path, what was expected and what was found. Relative paths in a file are
resolved against the file's own folder, so a config works from any working directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from medmeta_common.errors import ConfigError
from medmeta_common.typed_config import build, check, load_yaml_mapping
from medmeta_common.update_codec import Encoding

SYNTHETIC_PREFIX = "builtin:"


@dataclass(frozen=True)
class ImageConfig:
    """How every site's images are harmonised before training.

    Attributes
    ----------
    size : int
        Side of the square images the encoder sees.
    channels : {1, 3}
        Grey (1) or RGB (3); sources are converted.
    intensity : {"zscore", "minmax"}
        Per-image, per-channel normalisation.

    """

    size: int = 32
    channels: Literal[1, 3] = 1
    intensity: Literal["zscore", "minmax"] = "zscore"

    def __post_init__(self) -> None:
        check(8 <= self.size <= 512, field="size", expected="an integer in [8, 512]",
              found=self.size)


@dataclass(frozen=True)
class PartitionConfig:
    """Take one of ``parts`` patient-disjoint parts of a source (to simulate hospitals)."""

    parts: int
    index: int
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.parts >= 1, field="parts", expected="at least 1", found=self.parts)
        check(0 <= self.index < self.parts, field="index",
              expected=f"an integer in [0, {self.parts - 1}]", found=self.index)


@dataclass(frozen=True)
class DataConfig:
    """Where a site's images are, and which of them to use.

    Attributes
    ----------
    path : str
        A ``.npz`` file, a folder with a CSV manifest, a folder of class sub-folders,
        or ``builtin:demo/<site>`` for the built-in synthetic demo.
    split : {"train", "val", "test"} or None
        Split to read. Splits defined by the source are used as they are; otherwise
        records are split per patient/group with ``split_seed``. ``None`` reads all.
    classes : list of str, optional
        Keep only these classes (in this order); others are dropped.
    group_key : str, optional
        For plain ``.npz``: the array holding patient/group keys.
    partition : PartitionConfig, optional
        Keep one patient-disjoint part of the source.
    policy : {"strict", "lenient"}
        ``strict`` stops at the first bad file; ``lenient`` skips and reports each one.
    frames : {"middle", "all"}
        Multi-frame DICOM and 3-D volumes: keep the middle frame/slice, or all.
    manifest : str
        Manifest file name inside a DICOM folder.
    split_seed : int
        Seed of the per-group split when the source defines none.

    """

    path: str
    split: Literal["train", "val", "test"] | None = "train"
    classes: tuple[str, ...] | None = None
    group_key: str | None = None
    partition: PartitionConfig | None = None
    policy: Literal["strict", "lenient"] = "lenient"
    frames: Literal["middle", "all"] = "middle"
    manifest: str = "manifest.csv"
    split_seed: int = 0

    def __post_init__(self) -> None:
        check(bool(self.path), field="path", expected="a file or folder path", found=self.path)
        if self.classes is not None:
            check(len(set(self.classes)) == len(self.classes) and len(self.classes) > 0,
                  field="classes", expected="a non-empty list of distinct class names",
                  found=list(self.classes))

    @property
    def is_builtin(self) -> bool:
        """True for the built-in synthetic demo data."""
        return self.path.startswith(SYNTHETIC_PREFIX)


def resolve_path(base: Path, value: str) -> str:
    """``value`` relative to ``base`` unless absolute or built-in."""
    if value.startswith(SYNTHETIC_PREFIX) or Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser()) if not value.startswith(SYNTHETIC_PREFIX) else value
    return str((base / value).resolve())


def with_resolved_path(data: DataConfig, base: Path) -> DataConfig:
    """A copy of ``data`` whose path is resolved against ``base``."""
    return replace(data, path=resolve_path(base, data.path))


@dataclass(frozen=True)
class ModelConfig:
    """The shared encoder's architecture, and the scale of the site heads.

    Attributes
    ----------
    preset : {"small", "large"}
        ``small`` (~0.13 M parameters) trains at useful speed on 2 CPU cores; ``large``
        (~4.7 M) is for GPU sites.
    widths : list of int, optional
        Channels of each stage, overriding the preset.
    convs_per_stage : int, optional
        Convolutions per stage, overriding the preset.
    norm_groups : int
        GroupNorm groups (BatchNorm is never used: it breaks DP-SGD).
    weight_standardization : bool
        Standardise every convolution's filters (helps DP-SGD with GroupNorm).
    cosine_scale : float
        Inverse temperature of the cosine classifier and prototype logits.

    """

    preset: Literal["small", "large"] = "small"
    widths: tuple[int, ...] | None = None
    convs_per_stage: int | None = None
    norm_groups: int = 8
    weight_standardization: bool = True
    cosine_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.widths is not None:
            check(0 < len(self.widths) <= 6 and all(w > 0 for w in self.widths),
                  field="widths", expected="1 to 6 positive integers", found=list(self.widths))
        if self.convs_per_stage is not None:
            check(1 <= self.convs_per_stage <= 4, field="convs_per_stage",
                  expected="an integer in [1, 4]", found=self.convs_per_stage)
        check(self.cosine_scale > 0, field="cosine_scale", expected="a positive number",
              found=self.cosine_scale)


@dataclass(frozen=True)
class TrainConfig:
    """The local inner loop every site runs each round (sent by the server).

    Attributes
    ----------
    loss : {"cosine", "protonet"}
        ``cosine``: per-record cross-entropy against the site's cosine classifier
        (DP-valid, the default). ``protonet``: episodic prototypical loss, which couples
        the records of an episode, so it is refused under DP.
    local_steps : int
        Optimiser steps per round at each site.
    batch_size : int
        Expected records per step. Under DP it sets the Poisson sampling rate.
    ways : int, optional
        Classes per step; ``null`` uses all of the site's classes.
    lr, momentum : float
        Local SGD settings.
    augment : bool
        Random flips and shifts, drawn per record.
    augment_multiplicity : int
        Augmented views of each sampled record per step; under DP the record's
        gradient is the mean over its views, clipped once (De et al. 2022).
    head : {"train", "frozen"}
        Train the site's cosine head with the encoder, or keep it at its random,
        data-independent start (only the encoder learns, as in FedBABU).
    rotation_weight : float
        Weight of a self-supervised rotation-prediction loss (Gidaris et al. 2018):
        each sampled view is given a random quarter-turn, and the site-local rotation
        head must tell which. Per record, so DP-valid; 0 turns it off.
    shots, queries : int
        Episode shape of the ``protonet`` loss.

    """

    loss: Literal["cosine", "protonet"] = "cosine"
    local_steps: int = 20
    batch_size: int = 32
    ways: int | None = None
    lr: float = 0.03
    momentum: float = 0.9
    augment: bool = True
    augment_multiplicity: int = 1
    head: Literal["train", "frozen"] = "train"
    rotation_weight: float = 0.0
    shots: int = 5
    queries: int = 10

    def __post_init__(self) -> None:
        check(self.local_steps >= 1, field="local_steps", expected="at least 1",
              found=self.local_steps)
        check(self.batch_size >= 1, field="batch_size", expected="at least 1",
              found=self.batch_size)
        check(self.ways is None or self.ways >= 2, field="ways", expected="at least 2 or null",
              found=self.ways)
        check(self.lr > 0, field="lr", expected="a positive number", found=self.lr)
        check(0 <= self.momentum < 1, field="momentum", expected="a number in [0, 1)",
              found=self.momentum)
        check(1 <= self.augment_multiplicity <= 32, field="augment_multiplicity",
              expected="an integer in [1, 32]", found=self.augment_multiplicity)
        check(self.rotation_weight >= 0, field="rotation_weight", expected="0 or more",
              found=self.rotation_weight)


@dataclass(frozen=True)
class PrivacyConfig:
    """A site's differential-privacy settings. The site enforces them, not the server.

    Attributes
    ----------
    enabled : bool
        DP-SGD on (default). Turning it off is explicit and warned about at every start.
    epsilon : float
        The site's total budget; training stops before it would be exceeded.
    delta : float, optional
        δ of the guarantee; default ``min(1e-5, 1/(10 N))`` for N training records.
    max_grad_norm : float
        Per-record gradient clipping bound.
    noise_multiplier : float, optional
        Noise std / clip bound. ``null``: calibrated once so that the planned rounds
        spend exactly the budget.
    unit : {"image", "patient"}
        The privacy unit: one image (record), or one patient (all of a patient's
        images: patients are Poisson-sampled and each patient's summed gradient is
        clipped). ``patient`` needs patient IDs in the data (manifest, DICOM, group key).

    """

    enabled: bool = True
    epsilon: float = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    unit: Literal["image", "patient"] = "image"

    def __post_init__(self) -> None:
        check(self.epsilon > 0, field="epsilon", expected="a positive number", found=self.epsilon)
        check(self.delta is None or 0 < self.delta < 1e-3, field="delta",
              expected="a number in (0, 1e-3), well below 1/N", found=self.delta)
        check(self.max_grad_norm > 0, field="max_grad_norm", expected="a positive number",
              found=self.max_grad_norm)
        check(self.noise_multiplier is None or self.noise_multiplier > 0,
              field="noise_multiplier", expected="a positive number or null",
              found=self.noise_multiplier)


@dataclass(frozen=True)
class CentralDPConfig:
    """Site-level DP at the server (on top of the sites' record-level DP).

    Attributes
    ----------
    clip : float
        L2 bound on each site's update (encoder minus global encoder).
    noise_multiplier : float
        Noise std on the sum of the clipped updates, in units of ``clip``.
    delta : float
        δ of the site-level (ε, δ) guarantee; keep it well below 1 / number of sites.

    """

    clip: float
    noise_multiplier: float
    delta: float = 1e-3

    def __post_init__(self) -> None:
        check(self.clip > 0, field="clip", expected="a positive number", found=self.clip)
        check(self.noise_multiplier > 0, field="noise_multiplier",
              expected="a positive number", found=self.noise_multiplier)
        check(0 < self.delta < 0.1, field="delta", expected="a number in (0, 0.1)",
              found=self.delta)


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Secure aggregation (Flower's SecAgg+): the server learns only the sum of updates.

    Each site quantises its update (encoder minus global encoder, scaled by its record
    count over ``max_weight``), masks it with pairwise and private masks, and the
    server can remove the masks only from the sum. Sites that drop out after sending
    their key shares are unmasked from the shares of ``threshold`` others.

    Attributes
    ----------
    num_shares : float or int
        Neighbours each site secret-shares its keys with (a fraction of the sampled
        sites, or a count). ``1.0``: everyone (classic SecAgg).
    reconstruction_threshold : float or int
        Shares needed to unmask (fraction of ``num_shares``, or a count). Fewer
        surviving sites abort the round; more shares tolerate fewer dropouts but resist
        more colluding sites.
    clipping_range : float
        Every coordinate of an update is clipped to ``[-clipping_range, clipping_range]``
        before quantisation.
    quantization_range : int
        Integer levels over the clipping range (``2**22``: steps of about 5e-7 per unit).
    max_weight : float
        The largest record count a site may weigh in with; a larger site refuses the
        round with an error naming this setting. Precision scales with
        ``records / max_weight``, so keep it near the largest site.
    timeout : float, optional
        Seconds each protocol stage waits for replies (default: the round timeout).

    """

    num_shares: float = 1.0
    reconstruction_threshold: float = 0.67
    clipping_range: float = 1.0
    quantization_range: int = 2**22
    max_weight: float = 10_000.0
    timeout: float | None = None

    def __post_init__(self) -> None:
        check(self.num_shares > 0, field="num_shares", expected="a positive fraction or count",
              found=self.num_shares)
        check(self.reconstruction_threshold > 0, field="reconstruction_threshold",
              expected="a positive fraction or count", found=self.reconstruction_threshold)
        check(self.clipping_range > 0, field="clipping_range", expected="a positive number",
              found=self.clipping_range)
        check(2 <= self.quantization_range <= 2**24, field="quantization_range",
              expected="an integer in [2, 2**24] (the masks live modulo 2**32)",
              found=self.quantization_range)
        check(self.max_weight >= 1, field="max_weight", expected="at least 1",
              found=self.max_weight)


@dataclass(frozen=True)
class MetaUpdateConfig:
    """How the server turns site updates into a new global encoder.

    Reptile / first-order FedMeta: ``theta += meta_lr * step(agg_i(theta_i) - theta)``,
    where ``agg`` is the ``aggregator`` and ``step`` is plain (``sgd``), heavy-ball
    momentum, or Adam on the pseudo-gradient ``theta - agg_i(theta_i)``.

    Attributes
    ----------
    meta_lr : float
        Server (meta) learning rate; 1 with ``sgd`` is FedAvg.
    optimizer : {"sgd", "momentum", "adam"}
        The step on the pseudo-gradient; ``momentum`` and ``beta2`` are its settings.
    fraction_train, fraction_evaluate : float
        Fractions of connected sites asked to train / evaluate each round.
    evaluate_every : int
        Ask sites for few-shot validation accuracy every this many rounds (and after
        the last one); 1 (default) is every round. On the deployment engine every
        evaluate message costs each site a process start, so larger values make rounds
        shorter.
    min_sites : int, optional
        Fewest accepted updates for a meta-update (default 2, or 1 with one site).
    round_timeout : float
        Seconds a round waits for replies.
    aggregator : {"mean", "trimmed_mean", "median", "multikrum"}
        How accepted encoders are combined (:mod:`server.aggregation`): the
        record-weighted mean, or a rule that withstands hostile updates.
    trim_fraction : float
        Share of values cut at each end, per coordinate, by ``trimmed_mean``.
    max_faulty : int
        ``f``, the hostile sites ``multikrum`` withstands (it keeps ``n - f`` updates).
    max_update_norm : float, optional
        Reject a site's update whose L2 norm ``|theta_i - theta|`` exceeds this;
        ``null`` (default) turns the bound off.
    central_dp : CentralDPConfig, optional
        Site-level DP at the server (:mod:`server.central_dp`).
    secure_aggregation : SecureAggregationConfig, optional
        SecAgg+: the server sees only the sum of the updates (:mod:`server.secure`).
    update_encoding : {"float32", "float16", "int8"}
        What each site sends: its encoder in float32 (default), or its update (trained
        minus global) in float16 (half the bytes) or stochastically rounded int8 with a
        per-tensor scale (about a quarter); :mod:`medmeta_common.update_codec`.

    """

    meta_lr: float = 1.0
    optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    momentum: float = 0.9
    beta2: float = 0.99
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    evaluate_every: int = 1
    min_sites: int | None = None
    round_timeout: float = 3600.0
    aggregator: Literal["mean", "trimmed_mean", "median", "multikrum"] = "mean"
    trim_fraction: float = 0.2
    max_faulty: int = 1
    max_update_norm: float | None = None
    central_dp: CentralDPConfig | None = None
    secure_aggregation: SecureAggregationConfig | None = None
    update_encoding: Encoding = "float32"

    def __post_init__(self) -> None:
        check(0 <= self.trim_fraction < 0.5, field="trim_fraction",
              expected="a number in [0, 0.5)", found=self.trim_fraction)
        check(self.max_faulty >= 0, field="max_faulty", expected="0 or more",
              found=self.max_faulty)
        check(self.max_update_norm is None or self.max_update_norm > 0,
              field="max_update_norm", expected="a positive number or null",
              found=self.max_update_norm)
        check(self.meta_lr > 0, field="meta_lr", expected="a positive number",
              found=self.meta_lr)
        check(0 < self.fraction_train <= 1, field="fraction_train",
              expected="a number in (0, 1]", found=self.fraction_train)
        check(0 <= self.fraction_evaluate <= 1, field="fraction_evaluate",
              expected="a number in [0, 1]", found=self.fraction_evaluate)
        check(self.evaluate_every >= 1, field="evaluate_every", expected="1 or more (rounds)",
              found=self.evaluate_every)
        check(self.min_sites is None or self.min_sites >= 1, field="min_sites",
              expected="at least 1 (or null: 2, or 1 for a one-site federation)",
              found=self.min_sites)
        check(self.central_dp is None or self.aggregator == "mean", field="central_dp",
              expected="aggregator 'mean' (the robust rules have no site-level DP analysis)",
              found=self.aggregator)
        if self.secure_aggregation is not None:
            # The server sees only the sum: nothing per site can be checked or clipped.
            check(self.aggregator == "mean", field="secure_aggregation",
                  expected="aggregator 'mean' (robust rules need the individual updates, "
                  "which secure aggregation hides from the server)", found=self.aggregator)
            check(self.max_update_norm is None, field="secure_aggregation",
                  expected="max_update_norm: null (the server cannot measure an update it "
                  "never sees; each coordinate is bounded by clipping_range instead)",
                  found=f"max_update_norm {self.max_update_norm}")
            check(self.central_dp is None, field="secure_aggregation",
                  expected="central_dp: null (site-level DP clips each update at the server, "
                  "which secure aggregation hides; not supported together yet)",
                  found="central_dp set")
            check(self.update_encoding == "float32", field="update_encoding",
                  expected="float32 with secure_aggregation (SecAgg+ quantises the update "
                  "itself)", found=self.update_encoding)


@dataclass(frozen=True)
class FewShotConfig:
    """An N-way K-shot evaluation: episodes with disjoint support and query sets."""

    ways: int = 3
    shots: int = 5
    queries: int = 10
    episodes: int = 200
    finetune_steps: int = 0

    def __post_init__(self) -> None:
        check(self.ways >= 2, field="ways", expected="at least 2", found=self.ways)
        check(self.shots >= 1, field="shots", expected="at least 1", found=self.shots)
        check(self.queries >= 1, field="queries", expected="at least 1", found=self.queries)
        check(self.episodes >= 1, field="episodes", expected="at least 1", found=self.episodes)
        check(self.finetune_steps >= 0, field="finetune_steps", expected="0 or more",
              found=self.finetune_steps)


@dataclass(frozen=True)
class SiteConfig:
    """One hospital of a simulated federation.

    ``task: segmentation`` sites read image/mask pairs (``data.path`` a folder, see
    :mod:`medmeta_common.data.segmentation`; large images cut into ``tile`` pixel
    tiles) and train the shared encoder through a site-local decoder.
    """

    name: str
    data: DataConfig
    val_fraction: float = 0.2
    privacy: PrivacyConfig | None = None
    task: Literal["classification", "segmentation"] = "classification"
    tile: int = 128

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name and not self.name.startswith("."),
              field="name", expected="a site name without '/'", found=self.name)
        check(0 < self.val_fraction < 0.9, field="val_fraction", expected="a number in (0, 0.9)",
              found=self.val_fraction)


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

    def method_hash(self) -> str:
        """Fingerprint of the method (round count excluded, so a run can be extended)."""
        data = {k: asdict(self)[k] for k in ("name", "seed", "image", "model", "train",
                                              "server", "evaluation")}
        return _fingerprint(data)


# Server settings added after runs were already being made, with their defaults: left
# out of fingerprints while at the default, so that those runs can still be resumed.
_LATER_SERVER_DEFAULTS = {"aggregator": "mean", "trim_fraction": 0.2, "max_faulty": 1,
                          "max_update_norm": None, "central_dp": None,
                          "secure_aggregation": None, "update_encoding": "float32",
                          "evaluate_every": 1}


# Site settings added later, likewise left out of fingerprints while at their default.
_LATER_SITE_DEFAULTS = {"task": "classification", "tile": 128}


def _fingerprint(data: dict) -> str:
    if isinstance(data.get("sites"), list | tuple):
        data = {**data, "sites": [{k: v for k, v in site.items()
                                   if k not in _LATER_SITE_DEFAULTS
                                   or v != _LATER_SITE_DEFAULTS[k]}
                                  for site in data["sites"]]}
    server = data.get("server")
    if isinstance(server, dict):
        data = {**data, "server": {k: v for k, v in server.items()
                                   if k not in _LATER_SERVER_DEFAULTS
                                   or v != _LATER_SERVER_DEFAULTS[k]}}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
        self._check_aggregator()
        patient_segmentation = [s.name for s in self.sites if s.task == "segmentation"
                                and self.privacy_of(s).unit != "image"]
        check(not patient_segmentation, field="privacy.unit",
              expected="'image' at segmentation sites (one slice or tile; the patient unit is "
              "not implemented for segmentation yet)", found=f"'patient' at {patient_segmentation}")
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
        """Fingerprint of everything but the round count (so a run can be extended)."""
        data = asdict(self)
        data.pop("rounds")
        return _fingerprint(data)


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
    return replace(config, sites=sites, held_out=held_out)


__all__ = [
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
    "SiteConfig",
    "TrainConfig",
    "load_config",
    "resolve_path",
    "with_resolved_path",
]
