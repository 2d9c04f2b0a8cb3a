"""``server``: how the server turns site updates into a new global encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medmeta_common.config.typed import check
from medmeta_common.update_codec import Encoding


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
        Fewest accepted updates for a meta-update (default 2, or 1 with one site). A
        round with fewer *fails*: it does not count (no meta-update, no checkpoint) and
        is tried again.
    wait_for_sites : int, optional
        Connected sites a round waits for before it asks any to train (default:
        ``min_sites``). With ``min_sites: 1, wait_for_sites: 3`` every round starts
        with all three hospitals connected yet counts with one accepted update.
    max_failed_rounds : int
        Failed attempts of one round, in a row, after which the run stops with an error
        naming each site's reason (default 3).
    spare_rounds : int
        Rounds of privacy budget each site keeps for retried rounds: sites calibrate
        their noise for ``rounds + spare_rounds`` rounds (default 0: the planned rounds
        spend the whole budget, and a site that trained in a failed attempt refuses
        the last round rather than overspend). See docs/privacy.md.
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
        Site-level DP at the server (:mod:`medmeta_common.privacy.central_dp`).
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
    wait_for_sites: int | None = None
    max_failed_rounds: int = 3
    spare_rounds: int = 0
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
        check(self.wait_for_sites is None or self.wait_for_sites >= 1, field="wait_for_sites",
              expected="at least 1 (or null: min_sites)", found=self.wait_for_sites)
        check(self.max_failed_rounds >= 1, field="max_failed_rounds",
              expected="1 or more (failed attempts of a round before the run stops)",
              found=self.max_failed_rounds)
        check(self.spare_rounds >= 0, field="spare_rounds", expected="0 or more (rounds)",
              found=self.spare_rounds)
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
