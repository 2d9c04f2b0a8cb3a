"""Empirical privacy lower bounds from one training run (Steinke, Nasr & Jagielski 2023).

``m`` canaries are each included in training independently with probability 1/2. After
training, the auditor guesses membership for the canaries it is most confident about
(the ``k`` highest scores: "in", the ``k`` lowest: "out"). Under ε-DP the number of
correct guesses among the ``r`` made is stochastically dominated by
``Binomial(r, e^ε / (1 + e^ε))`` (their Theorem 3.1), so observing ``v`` correct
guesses rules out, at confidence ``1 - beta``, every ε whose binomial tail
``P[Bin >= v]`` is below ``beta``. The largest ε so ruled out is the empirical lower
bound reported here. δ is neglected (its term is of order ``m * δ``, tiny for the δ
medmeta uses), which can only make the audit stricter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom


@dataclass(frozen=True)
class AuditResult:
    """What one audit found."""

    epsilon_lower_bound: float
    guesses: int
    correct: int
    canaries: int
    confidence: float


def tail_probability(correct: int, guesses: int, epsilon: float) -> float:
    """``P[Binomial(guesses, e^eps / (1 + e^eps)) >= correct]``."""
    p = 1.0 / (1.0 + math.exp(-epsilon))
    return float(binom.sf(correct - 1, guesses, p))


def epsilon_lower_bound(correct: int, guesses: int, beta: float = 0.05) -> float:
    """The largest ε that ``correct`` of ``guesses`` rules out at confidence ``1 - beta``."""
    if guesses == 0 or tail_probability(correct, guesses, 0.0) >= beta:
        return 0.0
    low, high = 0.0, 50.0
    for _ in range(100):
        mid = (low + high) / 2
        if tail_probability(correct, guesses, mid) < beta:
            low = mid
        else:
            high = mid
    return low


def guess_and_score(scores: np.ndarray, included: np.ndarray, guesses_per_side: int,
                    beta: float = 0.05) -> AuditResult:
    """Guess "in" for the top and "out" for the bottom scores; bound ε from the hits."""
    order = np.argsort(scores)
    k = min(guesses_per_side, len(scores) // 2)
    correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
    return AuditResult(epsilon_lower_bound(correct, 2 * k, beta), 2 * k, correct,
                       len(scores), 1 - beta)
