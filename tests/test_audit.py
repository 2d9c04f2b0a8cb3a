"""The empirical privacy audit: its bound is right, and it can fail.

The slow tests run the real Opacus training on real cell images (BCCD) with canaries:
a non-private control must leak clearly, a DP run must stay below its claimed ε, and a
deliberately broken run (noise off) must make ``medmeta privacy audit`` fail.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binom

from medmeta_common.privacy.audit import epsilon_lower_bound, guess_and_score

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "medmeta.cli"]

# A small real site and a step budget in which a non-private run memorises canaries
# (79 or 76 of 80 guesses right over four seeds; 300 steps found 58 to 78).
AUDIT_ARGS = ["--config", str(ROOT / "configs" / "demo.yaml"), "--records", "500",
              "--steps", "600", "--batch-size", "64", "--canaries", "200", "--guesses", "40"]


def test_all_guesses_right_matches_the_closed_form() -> None:
    # r of r right: p^r = beta  =>  p = beta^(1/r), eps = log(p / (1 - p)).
    p = 0.05 ** (1 / 80)
    assert epsilon_lower_bound(80, 80) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)


def test_bound_is_the_largest_epsilon_ruled_out() -> None:
    bound = epsilon_lower_bound(70, 80)
    below = 1 / (1 + math.exp(-(bound - 1e-3)))
    above = 1 / (1 + math.exp(-(bound + 1e-3)))
    assert binom.sf(69, 80, below) < 0.05 <= binom.sf(69, 80, above)


def test_chance_level_guessing_proves_nothing() -> None:
    assert epsilon_lower_bound(40, 80) == 0.0
    assert epsilon_lower_bound(0, 0) == 0.0


def test_guesses_use_the_most_confident_canaries() -> None:
    included = np.array([True] * 50 + [False] * 50)
    scores = np.where(included, 1.0, -1.0) + np.linspace(0, 0.01, 100)
    result = guess_and_score(scores, included, guesses_per_side=20)
    assert (result.correct, result.guesses, result.canaries) == (40, 40, 100)
    shuffled = guess_and_score(scores, np.random.default_rng(0).permutation(included), 20)
    assert shuffled.epsilon_lower_bound < result.epsilon_lower_bound


def _audit(*extra: str, args: list[str] = AUDIT_ARGS) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([*CLI, "privacy", "audit", *args, "--json", *extra],
                            capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_control_leaks_and_dp_run_stays_below_its_claim(bccd_npz: Path) -> None:
    result, report = _audit("--data", str(bccd_npz), "--epsilon", "1")
    control, dp = report["runs"]["control"], report["runs"]["dp"]
    assert control["epsilon_lower_bound"] >= 1.0, control  # the audit has power here
    assert dp["claimed_epsilon"] == 1.0 and dp["noise_multiplier"] > 0
    assert dp["epsilon_lower_bound"] <= 1.0, dp
    assert result.returncode == 0 and report["passed"], result.stderr


@pytest.mark.slow
def test_noise_switched_off_makes_the_audit_fail(bccd_npz: Path, tmp_path: Path) -> None:
    # The broken mechanism (noise off, clipping on) on a model that memorises quickly:
    # the demo's recipe with a small CNN trained whole (79 of 80 guesses right in 300
    # steps; the FiLM-only Lite0 leaks about epsilon 1 only after 600 steps).
    demo = (ROOT / "configs" / "demo.yaml").read_text()
    small = demo.replace("model: {backbone: efficientnet_lite0, weights: imagenet, pool: [5]}",
                         "model: {backbone: small, weights: none}").replace(
        "trainable: film", "trainable: all")
    assert small.count("backbone: small") == 1 and "trainable: all" in small
    config = tmp_path / "small.yaml"
    config.write_text(small)
    args = ["--config", str(config), *AUDIT_ARGS[2:]]
    args[args.index("--steps") + 1] = "300"
    result, report = _audit("--data", str(bccd_npz), "--epsilon", "1", "--no-control",
                            "--noise-multiplier", "0", args=args)
    assert report["runs"]["dp"]["epsilon_lower_bound"] > 1.5
    assert result.returncode == 7 and not report["passed"]
    assert "exceeds the claimed epsilon 1" in result.stderr
