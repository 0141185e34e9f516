"""Fitting the map classifier's regression, and refitting it with a line's good bottles.

Numpy only, so `station calibrate` can refit on the station's machine, without torch. `station train`
fits on the training split (station/training/map_fit.py) and keeps those features in the bundle
(``calibration/map_features.json``); `station calibrate` fits again on them plus the features of the
line's own good bottles, labelled good. A bundle installed on a line it was not trained on reads that
line's good bottles as defects, because the autoencoder's map of an unfamiliar look is high everywhere;
measured on the project's renderer styles, each left out of training and calibrated on 30 of its good
bottles, the refit raised accuracy from 75.4 to 82.1 % (docs/models.md). Each calibration starts again
from the training features: calibrating twice does not pile one line's bottles on another's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from station.core.bundle import MapClassifierManifest
from station.core.map_classifier import softmax_rows
from station.errors import BundleError

#: L2 strength on the standardised features: measured on the three synthetic styles' lines (docs/models.md)
MAP_L2 = 1e-2
_STEPS = 3000
_LEARNING_RATE = 0.5
#: the map classifier's training features, relative to the bundle root
FEATURES_FILE = "calibration/map_features.json"


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


def fit_manifest(x: np.ndarray, y: np.ndarray, classes: tuple[str, ...], feature_set: str, threshold: float,
                 fit: dict[str, Any]) -> MapClassifierManifest:
    """The regression fitted on features ``x`` (rows) with class indices ``y``, as the manifest records it."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)  # a feature constant over the images carries nothing
    z = (x - mean) / std
    weights, bias = fit_logistic(z, y, len(classes))
    accuracy = float(((z @ weights + bias).argmax(axis=1) == y).mean())
    return MapClassifierManifest(
        feature_set=feature_set, threshold=threshold, mean=tuple(mean.tolist()), std=tuple(std.tolist()),
        weights=tuple(tuple(r) for r in weights.tolist()), bias=tuple(bias.tolist()),
        fit={**fit, "l2": MAP_L2, "training_accuracy": accuracy},
    )


def write_features(root: Path, mc: MapClassifierManifest, x: np.ndarray, labels: list[str],
                   images: list[str]) -> None:
    """Keep the training features in the bundle, so a calibration can refit on them."""
    path = root / FEATURES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"feature_set": mc.feature_set, "threshold": mc.threshold, "labels": labels, "images": images,
              "features": x.tolist()}
    path.write_text(json.dumps(record), encoding="utf-8")


class KeptFeatures(NamedTuple):
    """The map classifier's training features as the bundle keeps them: one row, label and image each."""

    x: np.ndarray
    labels: list[str]
    images: list[str]


def read_features(root: Path, mc: MapClassifierManifest) -> KeptFeatures | None:
    """The training features, labels and images kept with the bundle; None for a bundle made before they were
    kept."""
    path = root / FEATURES_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        x = np.asarray(record["features"], np.float64)
        labels = [str(v) for v in record["labels"]]
        images = [str(v) for v in record.get("images") or []]
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path}: not the map classifier's training features ({exc})") from exc
    if record.get("feature_set") != mc.feature_set or record.get("threshold") != mc.threshold \
            or x.ndim != 2 or x.shape[0] != len(labels) or x.shape[1] != len(mc.mean):
        raise BundleError(f"{path}: the features kept do not match decision.map_classifier "
                          f"({mc.feature_set}, unit {mc.threshold}, {len(mc.mean)} features); retrain the bundle")
    return KeptFeatures(x, labels, images)


def refit_with_line_good(mc: MapClassifierManifest, train_x: np.ndarray, train_labels: list[str],
                         good_x: np.ndarray, classes: tuple[str, ...], good: str, stamp: str) -> MapClassifierManifest:
    """The regression fitted again on the training features plus the line's good bottles, labelled ``good``."""
    x = np.concatenate([train_x, good_x])
    y = np.asarray([classes.index(c) for c in train_labels] + [classes.index(good)] * len(good_x))
    fit = {"images": len(train_x), "line_good": len(good_x), "refitted": f"station calibrate {stamp}"}
    return fit_manifest(x, y, classes, mc.feature_set, mc.threshold, fit)
