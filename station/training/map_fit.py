"""Fitting the map classifier (station/core/map_classifier.py) on the training images' anomaly maps.

The maps come from the served autoencoder through the serving code (the Inspector), so the features
fitted are the features served. The good training images are the autoencoder's own, so their maps
are cleaner than a new good bottle's; the held-out split, which neither model saw, is what
`station train` then judges the bundle on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from station.core.bundle import MapClassifierManifest, load_bundle
from station.core.folders import LabelledImage
from station.core.inspector import Inspector
from station.core.map_classifier import FEATURE_SET, map_features, softmax_rows
from station.training.data import load_inputs
from station.training.options import say

#: L2 strength on the standardised features: measured on the three synthetic styles' lines (docs/models.md)
MAP_L2 = 1e-2
_STEPS = 3000
_LEARNING_RATE = 0.5


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = MAP_L2) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent, each class weighted to an equal share.

    Returns (weights (d, k), bias (k,)). Deterministic: the loss is convex and the start is zero.
    """
    n, d = x.shape
    counts = np.bincount(y, minlength=n_classes).clip(min=1)
    sample_weight = (n / (n_classes * counts))[y][:, None]
    onehot = np.eye(n_classes)[y]
    weights = np.zeros((d, n_classes))
    bias = np.zeros(n_classes)
    for _ in range(_STEPS):
        grad = (softmax_rows(x @ weights + bias) - onehot) * sample_weight / n
        weights -= _LEARNING_RATE * (x.T @ grad + l2 * weights)
        bias -= _LEARNING_RATE * grad.sum(axis=0)
    return weights, bias


def fit_map_classifier(bundle_root: Path, items: list[LabelledImage], threshold: float,
                       classes: tuple[str, ...]) -> MapClassifierManifest:
    """The map classifier of the bundle at ``bundle_root`` (its autoencoder), fitted on ``items``."""
    inspector = Inspector(load_bundle(bundle_root))
    spec = inspector.preprocess_spec
    rows = []
    for item in items:
        inputs = load_inputs(item.path, spec)
        _, smoothed, score = inspector.anomaly(inputs)
        rows.append(map_features(smoothed, score, threshold, inputs.autoencoder))
    x = np.stack(rows)
    y = np.asarray([classes.index(i.label) for i in items])
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)  # a feature constant over the training images carries nothing
    weights, bias = fit_logistic((x - mean) / std, y, len(classes))
    accuracy = float((((x - mean) / std @ weights + bias).argmax(axis=1) == y).mean())
    say(f"map classifier: {len(items)} images, {x.shape[1]} features, training accuracy {accuracy:.3f}")
    return MapClassifierManifest(
        feature_set=FEATURE_SET, threshold=threshold, mean=tuple(mean.tolist()), std=tuple(std.tolist()),
        weights=tuple(tuple(r) for r in weights.tolist()), bias=tuple(bias.tolist()),
        fit={"images": len(items), "l2": MAP_L2, "training_accuracy": accuracy},
    )
