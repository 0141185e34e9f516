"""From the autoencoder's per-pixel error map to an image score and a defect region.

Shared by calibration (threshold choice) and serving, so the score that was
calibrated is the score that is served.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from station.core.preprocess import Mouth


@dataclass(frozen=True)
class AnomalyParams:
    smoothing_sigma: float
    top_k_fraction: float
    #: the bottle region: radii beyond ``mask_radius`` × the rim radius (the background around the
    #: mouth, which the polar view keeps out to ``radius_margin``) never score; None keeps the whole view
    mask_radius: float | None = None
    radius_margin: float = 1.0


@dataclass(frozen=True)
class Region:
    """Anomalous pixels above threshold, in canonical-view pixel coordinates."""

    bbox: tuple[int, int, int, int] | None  # x, y, width, height
    area_px: int
    area_fraction: float


def smooth(error_map: np.ndarray, params: AnomalyParams) -> np.ndarray:
    """(H, W) float32 polar error map, Gaussian-smoothed so single noisy pixels do not score,
    with everything outside the bottle region set to 0 (a typical good pixel of the z-scored map)."""
    m: np.ndarray = np.asarray(error_map, dtype=np.float32)
    if params.smoothing_sigma > 0:
        m = cv2.GaussianBlur(m, (0, 0), params.smoothing_sigma)
    if params.mask_radius is not None:
        radius_bins = m.shape[1]
        centres = (np.arange(radius_bins) + 0.5) / radius_bins * params.radius_margin
        outside = centres > params.mask_radius
        if outside.any():
            m = m.copy() if m is error_map else m
            m[:, outside] = 0.0
    return m


#: map bins beside an unseen one that are not scored either: the autoencoder's error spreads past the
#: filled-in samples' edge by about its first layers' reach
UNSEEN_REACH_BINS = 2


def mask_unseen(smoothed: np.ndarray, unseen: np.ndarray | None) -> np.ndarray:
    """``smoothed`` with the bins over samples the camera did not see (ModelInputs.unseen) set to 0."""
    if unseen is None:
        return smoothed
    h, w = smoothed.shape
    # The map may be coarser than the polar view: a bin is unseen when any of its samples is.
    coarse = cv2.resize(unseen.astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA) > 0
    r = UNSEEN_REACH_BINS
    # Rows are angles and wrap round the mouth; radii do not.
    wrapped = np.concatenate([coarse[-r:], coarse, coarse[:r]]).astype(np.uint8)
    coarse = cv2.dilate(wrapped, np.ones((2 * r + 1, 2 * r + 1), np.uint8),
                        borderType=cv2.BORDER_CONSTANT, borderValue=0)[r:-r] > 0
    out = smoothed.copy()
    out[coarse] = 0.0
    return out


def image_score(smoothed: np.ndarray, params: AnomalyParams) -> float:
    """Mean of the top ``top_k_fraction`` of pixels: small defects still move it."""
    flat = smoothed.ravel()
    k = max(1, round(flat.size * params.top_k_fraction))
    top = np.partition(flat, flat.size - k)[flat.size - k :]
    return float(top.mean())


def region(smoothed: np.ndarray, threshold: float, mouth: Mouth, radius_margin: float,
           canonical_size: int) -> Region:
    """Pixels of the polar map above ``threshold``, mapped back into the canonical view.

    Polar rows are angles (row 0 at angle 0, as cv2.warpPolar lays them out),
    columns radii out to ``radius_margin`` × the rim radius. Each bin's area is
    its true area in the view (r·dr·dθ), so the reported area does not depend
    on where on the bottle the defect sits.
    """
    mask = smoothed > threshold
    count = int(mask.sum())
    if count == 0:
        return Region(None, 0, 0.0)
    angle_bins, radius_bins = mask.shape
    rows, cols = np.nonzero(mask)
    outer = mouth.radius * radius_margin
    dr = outer / radius_bins
    dtheta = 2 * np.pi / angle_bins
    radius = (cols + 0.5) * dr
    theta = (rows + 0.5) * dtheta
    xs = np.clip(mouth.cx + radius * np.cos(theta), 0, canonical_size - 1)
    ys = np.clip(mouth.cy + radius * np.sin(theta), 0, canonical_size - 1)
    x0, x1 = int(np.floor(xs.min())), int(np.ceil(xs.max()))
    y0, y1 = int(np.floor(ys.min())), int(np.ceil(ys.max()))
    area = float((radius * dr * dtheta).sum())
    return Region((x0, y0, max(1, x1 - x0), max(1, y1 - y0)), round(area), min(1.0, area / canonical_size**2))
