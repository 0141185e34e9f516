"""Anomaly map → image score and a defect region in canonical-view coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from station.core.anomaly import AnomalyParams, image_score, region
from station.core.preprocess import Mouth


def test_region_maps_polar_bins_back_into_the_view() -> None:
    # 256 angle rows × 64 radius columns out to 1.0 × a rim of radius 320 around (450, 450).
    m = np.zeros((256, 64), np.float32)
    m[0:8, 48:56] = 10.0  # angles 0–11°, radii 240–280 px: right of the centre
    r = region(m, 5.0, Mouth(450.0, 450.0, 320.0), 1.0, 900)
    assert r.bbox is not None
    x, y, w, h = r.bbox
    assert 450 + 235 <= x <= 450 + 245 and x + w <= 450 + 285
    assert 445 <= y <= 455 and y + h <= 450 + 60
    # 8 × 8 bins: Σ r·dr·dθ for r in 240…280 px, dθ = 2π/256
    expected = sum((c + 0.5) * 5.0 * 5.0 * 2 * np.pi / 256 for c in range(48, 56)) * 8
    assert r.area_px == pytest.approx(expected, rel=0.01)
    assert region(m, 20.0, Mouth(450.0, 450.0, 320.0), 1.0, 900).bbox is None


def test_top_k_score_sees_a_small_defect() -> None:
    m = np.zeros((256, 64), np.float32)
    m[10:14, 10:14] = 8.0  # 16 of 16384 pixels
    p = AnomalyParams(smoothing_sigma=0.0, top_k_fraction=0.001)  # top 16 pixels
    assert image_score(m, p) == pytest.approx(8.0)
    assert image_score(np.zeros_like(m), p) == 0.0


def test_mask_keeps_the_bottle_and_drops_the_background_around_it() -> None:
    from station.core.anomaly import smooth

    # 128 radius columns out to 1.08 × the rim: columns past 1.03 × the rim are background.
    m = np.zeros((64, 128), np.float32)
    m[:, 125] = 9.0  # dust on the conveyor, outside the mouth
    m[5, 100] = 4.0  # a speck on the rim (radius 0.85)
    masked = AnomalyParams(smoothing_sigma=0.0, top_k_fraction=1 / m.size, mask_radius=1.03, radius_margin=1.08)
    unmasked = AnomalyParams(smoothing_sigma=0.0, top_k_fraction=1 / m.size)
    assert image_score(smooth(m, unmasked), unmasked) == pytest.approx(9.0)
    assert image_score(smooth(m, masked), masked) == pytest.approx(4.0)
    assert m[0, 125] == 9.0, "the model's own output is left as it was"
    edge = np.ones((64, 128), np.float32)
    kept = smooth(edge, masked)[0]
    # Column centres: 121 at 1.025 × the rim (bottle), 122 at 1.034 (background).
    assert kept[121] == 1.0 and kept[122] == 0.0 and kept[:122].all() and not kept[122:].any()
