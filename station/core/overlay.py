"""Anomaly maps drawn back onto the bottle: for the evaluation report and the reject archive."""

from __future__ import annotations

import cv2
import numpy as np

from station.core.preprocess import Mouth


def cartesian_map(anomaly_map: np.ndarray, mouth: Mouth, radius_margin: float, canonical_size: int,
                  side: int) -> np.ndarray:
    """The polar anomaly map (rows: angle, cols: radius) drawn back into a side×side canonical view."""
    f = side / canonical_size
    out = cv2.warpPolar(
        anomaly_map.astype(np.float32), (side, side), ((mouth.cx + 0.5) * f - 0.5, (mouth.cy + 0.5) * f - 0.5),
        mouth.radius * radius_margin * f, cv2.INTER_LINEAR + cv2.WARP_FILL_OUTLIERS + cv2.WARP_INVERSE_MAP,
    )
    return np.asarray(out)


def anomaly_overlay(view: np.ndarray, amap: np.ndarray, threshold: float) -> np.ndarray:
    """The view with the anomaly map as a heatmap (full scale at twice the threshold) and the region outlined."""
    scaled = np.clip(amap / (2 * threshold) * 255 if threshold > 0 else amap, 0, 255).astype(np.uint8)
    heat = cv2.applyColorMap(scaled, cv2.COLORMAP_JET)
    out = cv2.addWeighted(view, 0.6, heat, 0.4, 0)
    contours, _ = cv2.findContours((amap > threshold).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    return out
