"""Anomaly-threshold calibration on good images, shared by `station train` and `station calibrate`.

The threshold is the score quantile that rejects at most the target fraction
of good bottles; the scores it came from are kept with the bundle
(``calibration/anomaly_scores.json``) so the choice can be audited.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from station.bundle import Bundle, checksums, write_manifest
from station.errors import DatasetError
from station.frame import Frame
from station.pipeline import Pipeline

SCORES_FILE = "calibration/anomaly_scores.json"


def anomaly_scores(pipeline: Pipeline, frames: list[Frame]) -> list[float]:
    """Scores of good images as the station computes them; an image that cannot be inspected is an error."""
    scores = []
    for frame in frames:
        verdict = pipeline.process(frame)
        if verdict.decision is None:
            detail = verdict.error["detail"] if verdict.error else "not inspected"
            raise DatasetError(f"calibration image {frame.meta.get('path', frame.frame_id)}: {detail}")
        scores.append(verdict.decision.anomaly_score)
    return scores


def choose_threshold(scores: list[float], target_false_reject: float) -> tuple[float, str]:
    if not scores:
        raise DatasetError("no good images to calibrate on")
    if not 0 < target_false_reject < 1:
        raise DatasetError(f"target false-reject rate {target_false_reject} must be between 0 and 1")
    quantile = 1.0 - target_false_reject
    empirical = float(np.quantile(scores, quantile, method="higher"))
    # A few dozen images cannot show a 1 % tail; a fit to them can estimate
    # it. Anomaly scores are positive and right-skewed, so the fit is
    # log-normal (normal when a score is not positive). The threshold is the
    # stricter-on-good-bottles (higher) of the two estimates.
    z = NormalDist().inv_cdf(quantile)
    values = np.asarray(scores, dtype=np.float64)
    log_normal = bool((values > 0).all()) and len(values) > 1
    sample = np.log(values) if log_normal else values
    mean = float(sample.mean())
    std = float(sample.std(ddof=1)) if len(values) > 1 else 0.0
    fitted = float(np.exp(mean + z * std)) if log_normal else mean + z * std
    threshold = max(empirical, fitted)
    fit = "log-normal" if log_normal else "normal"
    method = (f"max of the empirical {quantile:g} quantile ({empirical:.4g}) and the {quantile:g} quantile of a "
              f"{fit} fit ({fitted:.4g}) to the anomaly scores of {len(scores)} held-out good images; "
              f"target false-reject rate {target_false_reject:g}")
    return threshold, method


def write_scores(root: Path, scores: list[float], threshold: float, method: str, images: list[str]) -> None:
    path = root / SCORES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"good_scores": scores, "threshold": threshold, "method": method, "images": images}
    path.write_text(json.dumps(record, indent=2), encoding="utf-8")


def recalibrate(bundle: Bundle, frames: list[Frame], target_false_reject: float) -> tuple[float, str]:
    """New threshold from good line images; rewrites the bundle's scores and manifest (new version)."""
    pipeline = Pipeline(bundle)
    scores = anomaly_scores(pipeline, frames)
    threshold, method = choose_threshold(scores, target_false_reject)
    m = bundle.manifest
    write_scores(bundle.root, scores, threshold, method, [str(f.meta.get("path", f.frame_id)) for f in frames])
    files = dict(m.files)
    files.update(checksums(bundle.root, [SCORES_FILE]))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    manifest = m.model_copy(update={
        "version": f"{m.version.split('+')[0]}+cal{stamp}",
        "anomaly": m.anomaly.model_copy(update={
            "threshold": threshold, "threshold_method": method, "calibration_scores": SCORES_FILE,
        }),
        "files": files,
    })
    tmp = bundle.root / ".manifest.yaml.tmp"
    write_manifest(bundle.root, manifest, name=tmp.name)
    os.replace(tmp, bundle.root / "manifest.yaml")
    return threshold, method
