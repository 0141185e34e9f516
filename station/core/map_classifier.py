"""The map classifier: the bottle's class from what the anomaly map shows of its defect.

A network taught from scratch on 16 images a class learns the renderer: on the project's dome-lit
line it named 75 % of bottles right, against 99 % on the ring-lit line it was tuned on. What tells
the classes apart is the same on every line: how large the anomalous region is, how far it reaches
round the mouth and across it, where it sits between the opening and the rim, how many pieces it is
in and how strongly it stands out. These are a few numbers measured on the autoencoder's map,
which is already in units of good bottles' error; a multinomial logistic regression on them needs
few images and, measured on the same dome line, names 92.5 % right (docs/models.md).

Every feature is measured in units of the anomaly threshold chosen at training (recorded with the
fitted weights), so the features do not depend on the scale of one autoencoder's map. A later
`station calibrate` moves the threshold the decision uses, not these units: measured on bundles
judged on a renderer style they never saw, recalibrating the units too cost 2.5–15 points of
accuracy (docs/models.md).
"""

from __future__ import annotations

import cv2
import numpy as np

#: the version of the feature list below; a bundle records the one it was fitted on
FEATURE_SET = "map-v1"
#: regions are where the map reaches these fractions of its own maximum, and these fractions of the threshold
RELATIVE_LEVELS = (0.5, 0.25)
THRESHOLD_LEVELS = (0.5, 1.0)
RADIAL_BANDS = 8


def _region_shape(m: np.ndarray, weights: np.ndarray, radius: np.ndarray) -> list[float]:
    """Size, angular and radial extent, radial centre, innermost and outermost radius, pieces."""
    rows, cols = m.any(axis=1), m.any(axis=0)
    if not cols.any():
        return [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    total = float(weights.sum()) + 1e-6
    pieces, _ = cv2.connectedComponents(m.astype(np.uint8))
    return [float(np.log1p(m.sum())), float(rows.mean()), float(cols.mean()),
            float((weights.sum(axis=0) * radius).sum() / total), float(radius[cols].min()),
            float(radius[cols].max()), float(np.log1p(pieces - 1))]


def map_features(smoothed: np.ndarray, score: float, threshold: float) -> np.ndarray:
    """(n_features,) float64 description of the anomalous region(s) of one bottle's smoothed polar map.

    Rows of ``smoothed`` are angles, columns radii from the centre out; ``score`` is the bottle's
    image score and ``threshold`` the bundle's anomaly threshold.
    """
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"the map classifier needs a calibrated anomaly threshold, got {threshold}")
    s = np.clip(np.asarray(smoothed, np.float64), 0.0, None) / threshold
    angles, radii = s.shape
    radius = (np.arange(radii) + 0.5) / radii
    peak = float(s.max())
    features = [float(np.log(max(score / threshold, 1e-3)))]
    for level in RELATIVE_LEVELS:
        m = s > level * peak if peak > 0 else np.zeros_like(s, bool)
        features += _region_shape(m, s * m, radius)
    for level in THRESHOLD_LEVELS:
        m = s > level
        pieces, _ = cv2.connectedComponents(m.astype(np.uint8))
        features += [float(np.log1p(m.sum())), float(np.log1p(pieces - 1))]
    usable = radii - radii % RADIAL_BANDS
    bands = s[:, :usable].reshape(angles, RADIAL_BANDS, -1).sum(axis=(0, 2))
    features += list(bands / (bands.sum() + 1e-6))
    per_angle = s.sum(axis=1)
    features.append(float(per_angle.max() / (per_angle.sum() + 1e-6)))
    return np.asarray(features, np.float64)


def softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def map_probabilities(features: np.ndarray, mean: np.ndarray, std: np.ndarray, weights: np.ndarray,
                      bias: np.ndarray) -> np.ndarray:
    """Class probabilities of the fitted logistic regression for one bottle's (or a batch's) features."""
    z = ((features - mean) / std) @ weights + bias
    return softmax_rows(z)
