"""The one-run canary audit of a site's mechanism: train once with canaries, bound ε.

``medmeta privacy audit`` runs the site's real training step (the task's loss in the
one DP-SGD loop, :mod:`medmeta_common.privacy.dp_sgd`, with the same sampler) on the
site's own training images plus ``m`` canaries: smooth random patterns, each with a
random label of the site and each included with probability 1/2. After training, a
canary's score is minus its loss under its label; the most and least confident
guesses give an empirical ε lower bound at 95% (:mod:`medmeta_common.privacy.audit`).
A DP run whose lower bound exceeds its claimed ε means something is broken (noise,
clipping, the sampling rate, or the accounting), and the audit fails. A non-private
control run beside it must leak, or the audit has no power and fails too. The
canaries never leave the site.

The mechanism is the caller's (:class:`AuditedMechanism`): this module owns the
canaries, the noise calibration and the verdict, not the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medmeta_common.data.records import SiteData
from medmeta_common.privacy.accounting import calibrate_noise, default_delta, epsilon_of
from medmeta_common.privacy.audit import AuditResult, guess_and_score
from medmeta_common.privacy.dp_sgd import DPSettings

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class AuditReport:
    """The audit's finding and the guarantee it was checked against."""

    result: AuditResult
    claimed_epsilon: float | None
    delta: float
    noise_multiplier: float
    steps: int
    sample_rate: float
    noise_multiplier_trained: float  # differs from the calibrated one only in broken runs

    @property
    def passed(self) -> bool:
        """The empirical lower bound does not contradict the claimed ε."""
        return self.claimed_epsilon is None or \
            self.result.epsilon_lower_bound <= self.claimed_epsilon


def make_canaries(site: SiteData, count: int, rng: np.random.Generator
                  ) -> tuple[SiteData, SiteData, np.ndarray]:
    """The training data with the included canaries, all canaries, and who was included.

    Canaries are smooth random patterns (8x8 Gaussian noise upsampled to the image
    size), each with a random class of the site: far from every real image, so
    membership shows in the loss, and distinct from each other after pooling. (White
    noise pools to nearly the same embedding for every canary and leaked erratically:
    a non-private control on 500 BCCD images found 50 to 79 of 80 guesses right
    depending on the seed; real images with a wrong label leaked less still.) Each is
    included with probability 1/2.
    """
    images = smooth_noise(count, site.images.shape[1:], rng)
    labels = rng.integers(0, len(site.classes), size=count)
    included = rng.random(count) < 0.5
    names = np.array([f"canary-{i}" for i in range(count)], dtype=object)
    canaries = SiteData(images=images, labels=labels, classes=site.classes, groups=names,
                        refs=tuple(names))
    members = canaries.subset(np.flatnonzero(included))
    train = SiteData(images=np.concatenate([site.images, members.images]),
                     labels=np.concatenate([site.labels, members.labels]),
                     classes=site.classes,
                     groups=np.concatenate([site.groups.astype(object), members.groups]),
                     refs=site.refs + members.refs)
    return train, canaries, included


def smooth_noise(count: int, shape: tuple[int, ...], rng: np.random.Generator,
                 cells: int = 8) -> np.ndarray:
    """Random ``cells x cells`` patterns blown up to ``shape``, zero mean, unit variance."""
    channels, height, width = shape
    coarse = torch.from_numpy(rng.standard_normal((count, channels, cells, cells))
                              .astype(np.float32))
    images = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    images = (images - images.mean(dim=(1, 2, 3), keepdim=True)) / \
        images.std(dim=(1, 2, 3), keepdim=True)
    return images.numpy()


# (training data with the included canaries, the DP settings or None for the control,
# all canaries, seed) -> each canary's score (higher: more confidently a member).
TrainAndScore = Callable[[SiteData, DPSettings | None, SiteData, int], np.ndarray]


@dataclass(frozen=True)
class AuditedMechanism:
    """The site's training as the audit runs it.

    Attributes
    ----------
    sample_rate : callable
        ``sample_rate(data)``: the Poisson rate the method uses on ``data``.
    steps : int
        DP-SGD steps of the audited run.
    max_grad_norm : float
        The clipping bound.
    train_and_score : callable
        Trains once on the given data under the given DP settings (the site's real
        training step) and scores every canary; see :data:`TrainAndScore`.

    """

    sample_rate: Callable[[SiteData], float]
    steps: int
    max_grad_norm: float
    train_and_score: TrainAndScore
    accountant: str = "prv"


def run_audit(site: SiteData, mechanism: AuditedMechanism, *, claimed_epsilon: float | None,
              canaries: int = 200, guesses_per_side: int = 40, seed: int = 0,
              noise_multiplier_used: float | None = None) -> AuditReport:
    """Train once with canaries and return the empirical lower bound.

    ``claimed_epsilon=None`` audits a non-private run (the control). The noise is
    calibrated so that the run spends exactly ``claimed_epsilon``;
    ``noise_multiplier_used`` replaces it in the *training only* — for tests that show
    a broken mechanism is caught.
    """
    rng = np.random.default_rng(seed)
    data, probes, included = make_canaries(site, canaries, rng)
    rate = mechanism.sample_rate(data)
    delta = default_delta(len(data))
    steps = mechanism.steps
    dp = None
    sigma = used = 0.0
    if claimed_epsilon is not None:
        sigma = calibrate_noise(epsilon=claimed_epsilon, delta=delta, sample_rate=rate,
                                steps=steps, accountant=mechanism.accountant)
        used = sigma if noise_multiplier_used is None else noise_multiplier_used
        dp = DPSettings(used, rate, mechanism.max_grad_norm)
    scores = mechanism.train_and_score(data, dp, probes, seed)
    result = guess_and_score(scores, included, guesses_per_side)
    if claimed_epsilon is not None:
        spent = epsilon_of([(sigma, rate, steps)], delta, mechanism.accountant)
        log.info("audited run: sigma %.3f, rate %.4f, %d steps, epsilon %.3f", sigma, rate,
                 steps, spent)
    return AuditReport(result, claimed_epsilon, delta, sigma, steps, rate, used)


@dataclass(frozen=True)
class AuditOutcome:
    """A DP run's audit and, optionally, the non-private control beside it."""

    dp: AuditReport
    control: AuditReport | None

    def problem(self, min_control_epsilon: float) -> str | None:
        """Why the audit fails, or ``None``: the claim is contradicted, or the audit is blind."""
        bound = self.dp.result.epsilon_lower_bound
        if not self.dp.passed:
            return (f"the empirical lower bound {bound:.2f} exceeds the claimed epsilon "
                    f"{self.dp.claimed_epsilon:g}: the noise, the clipping, the sampling rate "
                    f"or the accounting is broken")
        if self.control is not None and \
                self.control.result.epsilon_lower_bound < min_control_epsilon:
            return (f"the non-private control leaks too little (lower bound "
                    f"{self.control.result.epsilon_lower_bound:.2f} < {min_control_epsilon:g}): "
                    f"the audit has no power here, so its pass means nothing; use more "
                    f"canaries or steps")
        return None


def audit_mechanism(site: SiteData, mechanism: AuditedMechanism, *, epsilon: float,
                    canaries: int, guesses_per_side: int, control: bool, seed: int = 0,
                    noise_multiplier_used: float | None = None) -> AuditOutcome:
    """Audit the mechanism at budget ``epsilon``, with the non-private control beside it."""
    baseline = run_audit(site, mechanism, claimed_epsilon=None, canaries=canaries,
                         guesses_per_side=guesses_per_side, seed=seed) if control else None
    private = run_audit(site, mechanism, claimed_epsilon=epsilon, canaries=canaries,
                        guesses_per_side=guesses_per_side, seed=seed,
                        noise_multiplier_used=noise_multiplier_used)
    return AuditOutcome(private, baseline)
