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
from station.core.map_classifier import FEATURE_SET, map_features
from station.core.map_refit import fit_manifest, write_features
from station.training.data import load_inputs
from station.training.options import say


def map_feature_rows(bundle_root: Path, paths: list[Path], unit: float, feature_set: str = FEATURE_SET
                     ) -> np.ndarray:
    """(images, features): the map classifier's features of ``paths`` through the bundle at ``bundle_root``
    (its autoencoder, the serving code), in the unit ``unit``."""
    inspector = Inspector(load_bundle(bundle_root))
    spec = inspector.preprocess_spec
    rows = []
    for path in paths:
        inputs = load_inputs(path, spec)
        _, smoothed, score = inspector.anomaly(inputs)
        rows.append(map_features(smoothed, score, unit, inputs.autoencoder, feature_set, spec.radius_margin))
    return np.stack(rows)


def fit_map_classifier(bundle_root: Path, items: list[LabelledImage], threshold: float,
                       classes: tuple[str, ...]) -> MapClassifierManifest:
    """The map classifier of the bundle at ``bundle_root`` (its autoencoder), fitted on ``items``; the features
    are kept in the bundle (station/core/map_refit.py) for `station calibrate` to refit on."""
    x = map_feature_rows(bundle_root, [i.path for i in items], threshold)
    y = np.asarray([classes.index(i.label) for i in items])
    mc = fit_manifest(x, y, classes, FEATURE_SET, threshold, {"images": len(items)})
    write_features(bundle_root, mc, x, [i.label for i in items], [str(i.path) for i in items])
    say(f"map classifier: {len(items)} images, {x.shape[1]} features, "
        f"training accuracy {mc.fit['training_accuracy']:.3f}")
    return mc
