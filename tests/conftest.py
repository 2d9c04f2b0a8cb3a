"""Shared fixtures: where the real data lives, and a quiet, offline Flower."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDMETA_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not available: {path} (tests read ../shared/data)")
    return path


@pytest.fixture
def brain_npz() -> Path:
    return shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")


@pytest.fixture
def bccd_npz() -> Path:
    return shared_file("bccd/bccd_cells_32.npz")


@pytest.fixture
def pbc_npz() -> Path:
    return shared_file("pbc_blood/pbc_blood_5class_28.npz")


@pytest.fixture
def breast_npz() -> Path:
    return shared_file("medmnist/breastmnist_28.npz")
