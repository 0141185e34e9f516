"""Anomaly-threshold calibration on good images, shared by `station train` and `station calibrate`.

The threshold is the score quantile that rejects at most the target fraction
of good bottles; the scores it came from are kept with the bundle
(``calibration/anomaly_scores.json``) so the choice can be audited.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from station.core.bundle import Bundle, Manifest, MapClassifierManifest, checksums, write_manifest
from station.core.drift import ANOMALY_SCORE, MIN_REFERENCE, SCALE_FLOOR, SIDES, reference
from station.core.folders import GOOD, list_images
from station.core.frame import Frame
from station.core.inspector import Scores
from station.core.map_classifier import map_features
from station.core.map_refit import read_features, refit_with_line_good
from station.core.pipeline import Pipeline
from station.core.preprocess import preprocess
from station.core.verdict import Verdict
from station.errors import ConfigError, DatasetError
from station.sources.folder import load_frame

SCORES_FILE = "calibration/anomaly_scores.json"


def good_frames(folder: Path, what: str = "--good") -> list[Frame]:
    """The images under ``folder`` (recursive) as frames to calibrate on; a ConfigError when there are none."""
    if not folder.is_dir():
        raise ConfigError(f"{what} {folder} does not exist or is not a folder")
    paths = list_images(folder)
    if not paths:
        raise ConfigError(f"{what} {folder} holds no images")
    return [load_frame(p, n, folder, "calibrate", None) for n, p in enumerate(paths)]


def inspect_good(pipeline: Pipeline, frames: list[Frame]) -> list[Verdict]:
    """Good images inspected as the station inspects them; an image that cannot be inspected is an error."""
    verdicts = []
    for frame in frames:
        verdict = pipeline.process(frame)
        if verdict.decision is None:
            detail = verdict.error["detail"] if verdict.error else "not inspected"
            raise DatasetError(f"calibration image {frame.path or frame.frame_id}: {detail}")
        verdicts.append(verdict)
    return verdicts


def anomaly_scores(pipeline: Pipeline, frames: list[Frame]) -> list[float]:
    """Scores of good images as the station computes them; an image that cannot be inspected is an error."""
    return [_scores(v).anomaly_score for v in inspect_good(pipeline, frames)]


def _scores(verdict: Verdict) -> Scores:
    assert verdict.scores is not None  # inspect_good returns inspected verdicts only
    return verdict.scores


def line_map_features(pipeline: Pipeline, verdicts: list[Verdict], mc: MapClassifierManifest) -> np.ndarray:
    """The map classifier's features of the line's good images, from the maps their inspection made; only the
    polar view is made again (the verdict does not carry it)."""
    spec = pipeline.inspector.preprocess_spec
    rows = []
    for verdict in verdicts:
        image = verdict.frame.image
        assert image is not None  # inspected, so loaded
        scores = _scores(verdict)
        rows.append(map_features(scores.anomaly_map, scores.anomaly_score, mc.threshold,
                                 preprocess(image, spec).autoencoder, mc.feature_set, spec.radius_margin))
    return np.stack(rows)


#: Confidence of the tolerance bound: with this probability the false-reject rate is at most the target.
#: 95 % rather than 90 %: the 90 % bound put the threshold under a good bottle of an independent set,
#: while the 95 % one still sits well below the lowest defect (the figures: docs/models.md, "Calibration").
CONFIDENCE = 0.95


def tolerance_factor(n: int, coverage: float, confidence: float = CONFIDENCE) -> float:
    """One-sided normal tolerance factor k: mean + k·sd bounds ``coverage`` of the population with
    ``confidence``, from ``n`` samples (Natrella's approximation, NIST/SEMATECH e-Handbook 7.2.6.3;
    within a few percent of the exact noncentral-t value for n ≥ 10, conservative below)."""
    z_p = NormalDist().inv_cdf(coverage)
    z_g = NormalDist().inv_cdf(confidence)
    a = 1.0 - z_g**2 / (2.0 * (n - 1))
    b = z_p**2 - z_g**2 / n
    return (z_p + math.sqrt(z_p**2 - a * b)) / a


def choose_threshold(scores: list[float], target_false_reject: float,
                     confidence: float = CONFIDENCE) -> tuple[float, str]:
    if not scores:
        raise DatasetError("no good images to calibrate on")
    if not 0 < target_false_reject < 1:
        raise DatasetError(f"target false-reject rate {target_false_reject} must be between 0 and 1")
    quantile = 1.0 - target_false_reject
    empirical = float(np.quantile(scores, quantile, method="higher"))
    # A few dozen images cannot show a 1 % tail; a fit to them can estimate it,
    # but from 13 images the fit's own spread is uncertain, and a plain quantile
    # of the fit is exceeded by more good bottles than the target as often as
    # not. So the threshold is a tolerance bound of the fit: with 95 %
    # confidence at most the target rate of good bottles score above it. It
    # tightens toward the plain quantile as `station calibrate` sees more good
    # images. Anomaly scores are positive and right-skewed, so the fit is
    # log-normal (normal when a score is not positive). The threshold is the
    # higher of the empirical quantile and that bound.
    values = np.asarray(scores, dtype=np.float64)
    n = len(values)
    log_normal = bool((values > 0).all()) and n > 1
    sample = np.log(values) if log_normal else values
    mean = float(sample.mean())
    std = float(sample.std(ddof=1)) if n > 1 else 0.0
    k = tolerance_factor(n, quantile, confidence) if n > 1 else 0.0
    fitted = float(np.exp(mean + k * std)) if log_normal else mean + k * std
    threshold = max(empirical, fitted)
    fit = "log-normal" if log_normal else "normal"
    method = (f"max of the empirical {quantile:g} quantile ({empirical:.4g}) and the {confidence:.0%}-confidence "
              f"bound on the {quantile:g} quantile of a {fit} fit ({fitted:.4g}, k={k:.3f}) to the anomaly scores "
              f"of {n} held-out good images; target false-reject rate {target_false_reject:g}")
    return threshold, method


def write_scores(root: Path, scores: list[float], threshold: float, method: str, images: list[str]) -> None:
    path = root / SCORES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"good_scores": scores, "threshold": threshold, "method": method, "images": images}
    path.write_text(json.dumps(record, indent=2), encoding="utf-8")


def recalibrate(bundle: Bundle, frames: list[Frame], target_false_reject: float) -> Manifest:
    """New threshold from good line images; rewrites the bundle's scores and manifest (new version), which it
    returns."""
    pipeline = Pipeline(bundle)
    verdicts = inspect_good(pipeline, frames)
    scores = [_scores(v).anomaly_score for v in verdicts]
    threshold, method = choose_threshold(scores, target_false_reject)
    m = bundle.manifest
    write_scores(bundle.root, scores, threshold, method, [str(f.path or f.frame_id) for f in frames])
    files = dict(m.files)
    files.update(checksums(bundle.root, [SCORES_FILE]))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    decision = m.decision
    q = decision.classifier_min_anomaly_quantile
    if q is not None:  # the classifier's support moves with the line's good bottles, as the threshold does
        decision = decision.model_copy(update={
            "classifier_min_anomaly": float(np.quantile(np.asarray(scores, np.float64), q)),
            "classifier_min_anomaly_method": f"{q:.0%} quantile of {len(scores)} good anomaly scores "
                                             f"(station calibrate {stamp})"})
    mc = decision.map_classifier
    kept = read_features(bundle.root, mc) if mc is not None else None
    if mc is not None and kept is not None:
        # The map classifier learns what this line's good bottles look like, in its training unit.
        decision = decision.model_copy(update={"map_classifier": refit_with_line_good(
            mc, kept.x, kept.labels, line_map_features(pipeline, verdicts, mc), m.classes, GOOD, stamp)})
    drift = m.drift
    passing = [x for x in scores if x <= threshold]
    if drift is not None and len(passing) >= MIN_REFERENCE:
        # The anomaly-score drift reference is the passing good scores the threshold was set on: a line
        # recalibrated because its scores rose would otherwise show drift for ever.
        quantities = dict(drift.quantities)
        quantities[ANOMALY_SCORE] = reference(passing, SIDES[ANOMALY_SCORE],
                                              f"station calibrate {stamp}: good line images at or below the "
                                              "threshold", SCALE_FLOOR[ANOMALY_SCORE])
        skipped = {k: v for k, v in drift.skipped.items() if k != ANOMALY_SCORE}
        drift = drift.model_copy(update={"quantities": quantities, "skipped": skipped})
    manifest = m.model_copy(update={
        "version": f"{m.version.split('+')[0]}+cal{stamp}",
        "drift": drift,
        "anomaly": m.anomaly.model_copy(update={
            "threshold": threshold, "threshold_method": method, "calibration_scores": SCORES_FILE,
        }),
        "decision": decision,
        "files": files,
    })
    write_manifest(bundle.root, manifest)
    return manifest
