"""The few-shot benchmark runs from a fresh clone in its quick mode, on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fewshot_quick_mode_measures_every_method_and_resumes(tmp_path: Path) -> None:
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    out = tmp_path / "quick.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "fewshot.py"), "--quick",
               "--methods", "prior,fedavg,medmeta", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"prior", "fedavg eps=8", "medmeta eps=8"}
    for figures in results.values():
        for scenario in ("brain-shift", "blood-new", "breast"):
            accuracy = figures[scenario]["5"]
            assert 0.0 < accuracy["mean"] <= 1.0 and accuracy["episodes"] == 10
    assert "| medmeta eps=8 |" in first.stdout
    # A second call finds every method measured and only prints the table.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "already measured" in again.stderr
    assert "trained and evaluated" not in again.stderr


@pytest.mark.slow
def test_update_encoding_quick_mode_halves_and_quarters_the_bytes() -> None:
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "update_encoding.py"),
                             "--quick"], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    ratios = {line.split("|")[1].split()[0]: float(line.split("|")[3].strip().rstrip("x"))
              for line in result.stdout.splitlines() if line.startswith("| float")
              or line.startswith("| int8")}
    assert ratios == {"float32": 1.0, "float16": 0.5, "int8": 0.25}
