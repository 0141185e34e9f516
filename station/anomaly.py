"""From the autoencoder's per-pixel error map to an image score and a defect region.

Shared by calibration (threshold choice) and serving, so the score that was
calibrated is the score that is served.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AnomalyParams:
    smoothing_sigma: float
    top_k_fraction: float


@dataclass(frozen=True)
class Region:
    """Anomalous pixels above threshold, in canonical-view pixel coordinates."""

    bbox: tuple[int, int, int, int] | None  # x, y, width, height
    area_px: int
    area_fraction: float


def smooth(error_map: np.ndarray, params: AnomalyParams) -> np.ndarray:
    """(H, W) float32 error map, Gaussian-smoothed so single noisy pixels do not score."""
    m: np.ndarray = np.asarray(error_map, dtype=np.float32)
    if params.smoothing_sigma > 0:
        m = cv2.GaussianBlur(m, (0, 0), params.smoothing_sigma)
    return m


def image_score(smoothed: np.ndarray, params: AnomalyParams) -> float:
    """Mean of the top ``top_k_fraction`` of pixels: small defects still move it."""
    flat = smoothed.ravel()
    k = max(1, round(flat.size * params.top_k_fraction))
    top = np.partition(flat, flat.size - k)[flat.size - k :]
    return float(top.mean())


def region(smoothed: np.ndarray, threshold: float, canonical_size: int) -> Region:
    mask = smoothed > threshold
    h, w = mask.shape
    scale_x = canonical_size / w
    scale_y = canonical_size / h
    count = int(mask.sum())
    if count == 0:
        return Region(None, 0, 0.0)
    ys, xs = np.nonzero(mask)
    x0, x1 = int(xs.min()), int(xs.max()) + 1
    y0, y1 = int(ys.min()), int(ys.max()) + 1
    bbox = (
        round(x0 * scale_x),
        round(y0 * scale_y),
        round((x1 - x0) * scale_x),
        round((y1 - y0) * scale_y),
    )
    return Region(bbox, round(count * scale_x * scale_y), count / mask.size)
