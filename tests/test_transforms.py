"""Harmonisation: channels, size and intensity come out the same for every source."""

from __future__ import annotations

import numpy as np
import pytest

from medmeta_common.data.issues import IssueLog
from medmeta_common.data.records import RawRecord, RawSite
from medmeta_common.data.transforms import harmonise, harmonise_stack


def test_grey_to_rgb_and_back() -> None:
    grey = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float32)
    rgb = harmonise_stack(grey, size=16, channels=3, intensity="minmax")
    assert rgb.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(rgb[:, 0], rgb[:, 2])
    back = harmonise_stack(rgb, size=16, channels=1, intensity="minmax")
    np.testing.assert_allclose(back, harmonise_stack(grey, size=16, channels=1,
                                                     intensity="minmax"), atol=1e-5)


def test_zscore_per_image_and_aspect_kept_with_padding() -> None:
    wide = np.ones((1, 1, 20, 40), dtype=np.float32) * 7
    wide[..., 5:15, 10:30] = 9
    out = harmonise_stack(wide, size=20, channels=1, intensity="zscore")
    assert out.shape == (1, 1, 20, 20)
    assert out.mean() == pytest.approx(0, abs=1e-5) and out.std() == pytest.approx(1, abs=1e-4)
    # 20x40 -> 10x20, padded top and bottom with the minimum: rows 0..4 are background.
    assert np.allclose(out[0, 0, :5], out[0, 0, 0, 0])


def test_flat_image_does_not_divide_by_zero() -> None:
    out = harmonise_stack(np.full((1, 1, 8, 8), 3.0), size=8, channels=1, intensity="zscore")
    assert np.isfinite(out).all() and np.allclose(out, 0)


def test_non_finite_record_is_reported_and_dropped() -> None:
    good = np.ones((1, 8, 8), dtype=np.float32)
    bad = good.copy()
    bad[0, 0, 0] = np.nan
    site = RawSite(root="x", format="test", classes=("a",),
                   records=[RawRecord(good, 0, "p", "good"), RawRecord(bad, 0, "p", "bad")])
    issues = IssueLog("lenient")
    data = harmonise(site, size=8, channels=1, intensity="zscore", issues=issues)
    assert data.refs == ("good",)
    assert [i.file for i in issues.issues] == ["bad"]
