"""The bundle's drift reference (station/core/drift.py), measured on the training data by the serving code.

Here, not in core: it reads image files through the folder source, and core sits below the sources.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from station.core.bundle import DriftManifest, DriftQuantity
from station.core.drift import (
    ANOMALY_SCORE,
    BRIGHTNESS,
    CONTRAST,
    GOOD_CONFIDENCE,
    MIN_REFERENCE,
    MOUTH_OFFSET,
    MOUTH_RADIUS,
    SCALE_FLOOR,
    SIDES,
    TAIL,
    Z,
    reference,
    view_measures,
)
from station.core.folders import GOOD
from station.core.imageio import read_image
from station.core.pipeline import Pipeline
from station.core.preprocess import preprocess
from station.sources.folder import load_frame


def drift_reference(pipeline: Pipeline, good_images: Iterable[Path], holdout_good: Iterable[Path],
                    anomaly_scores: Sequence[float], threshold: float) -> DriftManifest:
    """The bundle's ``drift`` section, from the training data, by the serving code itself.

    ``good_images``: every good image of the training data; geometry and photometry do not depend on
    the models, so all of them are a sample of the line. ``anomaly_scores``: the out-of-sample scores
    the threshold was chosen on (cross-fitted). ``holdout_good``: good images neither model trained on,
    run through ``pipeline`` for P(good).
    """
    spec = pipeline.inspector.preprocess_spec
    measures: dict[str, list[float]] = {MOUTH_OFFSET: [], MOUTH_RADIUS: [], BRIGHTNESS: [], CONTRAST: []}
    for path in good_images:
        for name, value in zip(measures, view_measures(preprocess(read_image(path), spec), spec), strict=True):
            measures[name].append(value)
    confidences = []
    for path in holdout_good:
        verdict = pipeline.process(load_frame(path, 0, path.parent, "train", GOOD))
        if verdict.decision is not None and verdict.verdict == "pass":
            confidences.append(verdict.decision.scores[GOOD])
    passing_scores = [s for s in anomaly_scores if s <= threshold]
    sources = {
        MOUTH_OFFSET: "good training images, located mouth", MOUTH_RADIUS: "good training images, located mouth",
        BRIGHTNESS: "good training images, polar view", CONTRAST: "good training images, polar view",
        ANOMALY_SCORE: "the out-of-sample good scores the threshold was chosen on (cross-fitted, or the "
                       "calibration split), those at or below the threshold",
        GOOD_CONFIDENCE: "P(good) of held-out good images that passed, through the serving pipeline",
    }
    values: dict[str, list[float]] = {**measures, ANOMALY_SCORE: passing_scores, GOOD_CONFIDENCE: confidences}
    quantities: dict[str, DriftQuantity] = {}
    skipped: dict[str, str] = {}
    for name, vals in values.items():
        if len(vals) < MIN_REFERENCE:
            skipped[name] = f"{len(vals)} reference values, fewer than {MIN_REFERENCE}"
        else:
            quantities[name] = reference(vals, SIDES[name], sources[name], SCALE_FLOOR[name])
    return DriftManifest(tail=TAIL, z=Z, quantities=quantities, skipped=skipped)
