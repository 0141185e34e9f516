"""`station adapt`: a bundle carried to a new line with nothing but that line's good bottles.

A bundle installed on a line whose look it never saw reads every bottle as a little anomalous: its
autoencoder learnt another lamp, glass and background. `station calibrate` moves the threshold and
teaches the map classifier the line's good bottles, but the maps stay those of a stranger: on the
project's renderer styles, each left out of training, the calibrated bundles rejected 92.5 / 70 / 80 %
of defects (ring / dome / backlit), the adapted ones 98.8 / 95 / 90 %, good passed 95–100 %
(docs/models.md, "`station adapt`").

What tells the classes apart does not depend on the line (station/core/map_classifier.py: the defect's
size, place and shape on the map, in units of the line's own good bottles), so `station adapt` keeps
the map classifier and changes what it reads: the autoencoder is trained again on the line's good
bottles (cross-fitted for the threshold, as `station train` does), the threshold and the features'
unit come from those scores, and the map classifier is fitted again on the bundle's labelled training
features plus the line's good bottles. No defect of the new line is needed.

The CNN classifier is copied as it was and not served: a bundle that names classes with it is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from station.core.atomic import swap_in_dir
from station.core.bundle import Manifest, checksums, load_bundle, preprocess_spec, write_manifest
from station.core.folders import GOOD, LabelledImage, list_images
from station.core.map_refit import FEATURES_FILE, fit_manifest, read_features, write_features
from station.core.pipeline import Pipeline
from station.core.preprocess import Lighting, agreed_lighting
from station.errors import ConfigError, DatasetError
from station.tools.calibrate import SCORES_FILE, write_scores
from station.tools.drift_reference import drift_reference
from station.training.anomaly_model import fit_anomaly_model
from station.training.crossfit import crossfit_threshold
from station.training.data import fingerprint, load_inputs
from station.training.decision import classifier_support
from station.training.export import INPUT_NAME, check_parity, export_onnx
from station.training.map_fit import map_feature_rows
from station.training.options import CROSS_FIT_FOLDS, TrainOptions, say

#: the autoencoder is trained and its threshold set on these; under it the cross-fitted folds are too thin
MIN_GOOD = 16
#: under this many, adapting warns: a dome-lit line adapted on 30 good bottles (500 steps) named 62.5 % of its
#: bottles right and rejected 56 % of defects, on 60 (1000 steps) 88.8 % and 95 % (docs/models.md)
RECOMMENDED_GOOD = 60


@dataclass
class AdaptOptions:
    model: Path
    good: Path
    out: Path
    #: None: station train's default (1000), whatever the bundle was trained with
    ae_steps: int | None = None
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    #: "auto": the lighting every one of the line's good images is located under (mixed: decided per frame)
    lighting: Lighting = "auto"
    target_false_reject: float = 0.01
    cross_fit_folds: int = CROSS_FIT_FOLDS
    name: str | None = None


def _line_good(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ConfigError(f"--good {folder} does not exist or is not a folder")
    paths = list_images(folder)
    if len(paths) < MIN_GOOD:
        raise DatasetError(f"--good {folder}: {len(paths)} images; adapting needs at least {MIN_GOOD} good bottles "
                           "of the line to train the autoencoder on and set its threshold")
    return paths


def _split_record(folder: Path, paths: list[Path]) -> dict[str, Any]:
    """The adapted bundle's training images, in the layout `station convert` reads for INT8 calibration."""
    rows = [{"path": p.relative_to(folder).as_posix(), "label": GOOD} for p in paths]
    return {"root": str(folder.resolve()), "train": rows, "holdout": [], "calibration": [], "validation": []}


def adapt_bundle(opts: AdaptOptions) -> Manifest:
    started = time.monotonic()
    if opts.cross_fit_folds < 2:
        raise ConfigError(f"--cross-fit-folds {opts.cross_fit_folds}: station adapt sets the threshold on "
                          "cross-fitted scores of the line's good bottles, so it needs at least 2 folds")
    source = load_bundle(opts.model)
    m = source.manifest
    mc = m.decision.map_classifier
    if m.decision.classes_from != "map" or mc is None:
        raise ConfigError(f"{opts.model}: its classes come from {m.decision.classes_from!r}; station adapt carries "
                          "the map classifier to a new line (train the bundle with --classes-from map)")
    kept = read_features(source.root, mc)
    if kept is None:
        raise ConfigError(f"{opts.model}: the bundle keeps no map classifier training features ({FEATURES_FILE}); "
                          "it was trained before they were kept: retrain it")
    paths = _line_good(opts.good)
    if len(paths) < RECOMMENDED_GOOD:
        say(f"warning: {len(paths)} good bottles in {opts.good}, under {RECOMMENDED_GOOD}: the autoencoder, its "
            "threshold and the map classifier's good class rest on few images; give more good bottles of the line")
    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True, warn_only=True)

    view = m.view
    if opts.lighting == "auto":
        probe = preprocess_spec(m.canonical_size, view.model_copy(update={"lighting": "auto"}), m.inputs)
        view = view.model_copy(update={"lighting": agreed_lighting(load_inputs(p, probe).mouth.lighting
                                                                   for p in paths)})
    else:
        view = view.model_copy(update={"lighting": opts.lighting})
    spec = preprocess_spec(m.canonical_size, view, m.inputs)
    x_ae = torch.stack([torch.from_numpy(load_inputs(p, spec).autoencoder[0]) for p in paths])
    ae = m.models["autoencoder"]
    training = dict(m.training)
    train_opts = TrainOptions(
        data=opts.good, out=opts.out, seed=opts.seed, threads=opts.threads, device=opts.device,
        ae_steps=opts.ae_steps or TrainOptions.ae_steps,
        anomaly_model=str(training.get("anomaly_model") or "autoencoder"),
        input_view="residual" if ae.arch.endswith("+residual") else "raw",
        cross_fit_folds=opts.cross_fit_folds, target_false_reject=opts.target_false_reject)
    say(f"adapting {opts.model} ({m.name} {m.version}) to {len(paths)} good bottles of {opts.good}; lighting "
        f"{view.lighting}; anomaly model {train_opts.anomaly_model}, {train_opts.ae_steps} steps, cross-fitted over "
        f"{opts.cross_fit_folds} folds")
    fit = fit_anomaly_model(x_ae, train_opts)
    assert fit.crossfit is not None  # at least 2 folds
    scores = fit.crossfit.scores

    tmp = opts.out.parent / f".{opts.out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source.root, tmp)
    export_onnx(fit.export, (x_ae[:1],), tmp / ae.file, (INPUT_NAME,), "anomaly_map")
    parity = check_parity(fit.export, tmp / ae.file, (INPUT_NAME,), "anomaly_map", (x_ae[:4],), atol=1e-2)
    say(f"exported ONNX; max |torch − ONNX Runtime|: autoencoder {parity:.1e}")

    unit, threshold, method = crossfit_threshold(scores, opts.target_false_reject, opts.cross_fit_folds)
    method = f"station adapt: {method}"
    write_scores(tmp, scores, threshold, method, [p.relative_to(opts.good).as_posix() for p in paths])
    (tmp / "split.json").write_text(json.dumps(_split_record(opts.good, paths), indent=2), encoding="utf-8")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    # The new autoencoder must be in the manifest before the line's maps are read through the bundle.
    manifest = m.model_copy(update={
        "name": opts.name or opts.out.name, "version": stamp,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "view": view,
        "anomaly": m.anomaly.model_copy(update={
            "threshold": threshold, "threshold_method": method, "calibration_scores": SCORES_FILE}),
        "files": {**m.files, **checksums(tmp, [ae.file, SCORES_FILE, "split.json"])}})
    write_manifest(tmp, manifest)

    # The line's good bottles as the served autoencoder maps them (its own training images, as the good
    # bottles `station train` fits the map classifier on are), in the new unit; the bundle's labelled
    # features are already relative to their own line's unit.
    good_x = map_feature_rows(tmp, paths, unit, mc.feature_set)
    x = np.concatenate([kept.x, good_x])
    labels = kept.labels + [GOOD] * len(paths)
    y = np.asarray([m.classes.index(c) for c in labels])
    adapted_mc = fit_manifest(x, y, m.classes, mc.feature_set, unit,
                              {"images": len(kept.x), "line_good": len(paths), "refitted": f"station adapt {stamp}"})
    write_features(tmp, adapted_mc, x, labels, kept.images + [str(p) for p in paths])
    say(f"map classifier: the bundle's {len(kept.x)} labelled images and the line's {len(paths)} good bottles, "
        f"training accuracy {adapted_mc.fit['training_accuracy']:.3f}")

    # The classifier's training images a class are the kept features' labels (station train fitted it on them).
    support = classifier_support(scores, {c: kept.labels.count(c) for c in m.classes})
    decision = m.decision.model_copy(update={
        "map_classifier": adapted_mc, "classifier_min_anomaly": support.value,
        "classifier_min_anomaly_quantile": support.quantile, "classifier_min_anomaly_method": support.method})
    manifest = manifest.model_copy(update={"decision": decision,
                                           "files": {**manifest.files, **checksums(tmp, [FEATURES_FILE])}})
    write_manifest(tmp, Manifest.model_validate(manifest.model_dump()))

    pipeline = Pipeline(load_bundle(tmp))
    # No good image of the line is held out from both models here, so P(good) has no honest reference
    # and is left unwatched (the drift section says so); geometry, photometry and scores are the line's.
    drift = drift_reference(pipeline, paths, [], scores, threshold)
    seconds = round(time.monotonic() - started, 1)
    manifest = manifest.model_copy(update={
        "drift": drift,
        "training": {**training, "data_root": str(opts.good.resolve()), "split": "split.json",
                     "data_fingerprint": fingerprint(opts.good, [LabelledImage(p, GOOD) for p in paths]),
                     "adapted": {"from": f"{m.name} {m.version}", "source": str(opts.model.resolve()),
                                 "line_good": len(paths), "ae_steps": train_opts.ae_steps, "seed": opts.seed,
                                 "cross_fit_folds": opts.cross_fit_folds, "lighting": view.lighting,
                                 "seconds": seconds, "source_metrics": m.metrics}},
        "metrics": {"line_good_images": len(paths), "threshold": threshold,
                    "line_good_over_threshold": sum(s > threshold for s in scores),
                    "map_classifier_training_accuracy": adapted_mc.fit["training_accuracy"],
                    "onnx_parity_max_abs": {"autoencoder": parity},
                    "training_seconds": {"autoencoder": round(fit.seconds, 1), "total": seconds}},
    })
    write_manifest(tmp, manifest)
    load_bundle(tmp)  # the bundle we hand over must load
    swap_in_dir(tmp, opts.out)
    say(f"adapted: threshold {threshold:.5f} ({method}); total {seconds} s")
    return manifest

