"""`station train`: classifier + autoencoder → ONNX bundle, calibrated and evaluated.

The bundle is written to a temporary folder next to ``--out`` and moved into
place only when complete, so a failed or interrupted training never leaves a
half-written bundle where a station would load it.

This module assembles the bundle (export, manifest, calibration, the held-out
evaluation); the stages it runs live beside it: options.py (options and shared
constants), prepare.py (data, split, anomaly model), anomaly_model.py and
classifier.py (the two trainings).
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from station.core.atomic import swap_in_dir
from station.core.bundle import (
    CLASS_SOURCES,
    AnomalyManifest,
    DecisionManifest,
    Manifest,
    ModelFile,
    checksums,
    load_bundle,
    write_manifest,
)
from station.core.defect_rule import DEFECT_SUM
from station.core.folders import BOTTLE_CLASSES, GOOD, LabelledImage
from station.core.frame import Frame
from station.core.map_refit import FEATURES_FILE
from station.core.pipeline import Pipeline
from station.errors import DatasetError
from station.service.replay import ReplayCollector
from station.sources.folder import load_frame
from station.tools.calibrate import SCORES_FILE, anomaly_scores, choose_threshold, write_scores
from station.tools.drift_reference import drift_reference
from station.training.classifier import served_probabilities, train_classifier
from station.training.crossfit import crossfit_threshold
from station.training.data import Split, fingerprint
from station.training.decision import classifier_support, fit_temperature
from station.training.export import INPUT_NAME, check_parity, export_onnx
from station.training.map_fit import fit_map_classifier
from station.training.nets import (
    AUTOENCODER_ARCH,
    DRAEM_ARCH,
    ClassifierExport,
    arch_name,
)
from station.training.options import (
    AE_POOL,
    CANONICAL_SIZE,
    CLASSIFIER_ROTATIONS,
    MARGIN_WARN,
    MASK_RADIUS,
    SMOOTHING_SIGMA,
    TOP_K_FRACTION,
    TrainOptions,
    say,
)
from station.training.prepare import prepare


def _frames(items: list[LabelledImage], root: Path) -> list[Frame]:
    return [load_frame(i.path, n, root, "train", i.label) for n, i in enumerate(items)]


def _split_record(split: Split, root: Path) -> dict[str, Any]:
    def rows(items: list[LabelledImage]) -> list[dict[str, str]]:
        return [{"path": i.path.relative_to(root).as_posix(), "label": i.label} for i in items]

    return {
        "root": str(root.resolve()),
        "train": rows(split.train),
        "holdout": rows(split.holdout),
        "calibration": rows(split.calibration),
        "validation": rows(split.validation),
    }


def train_bundle(opts: TrainOptions) -> Manifest:
    started = time.monotonic()
    if opts.classes_from not in CLASS_SOURCES:
        raise DatasetError(f"unknown class source {opts.classes_from!r}; choose {', '.join(CLASS_SOURCES)}")
    classes = BOTTLE_CLASSES
    p = prepare(opts)
    root, pool, split, view, inputs = p.root, p.pool, p.split, p.view, p.inputs
    x_rgb, x_ae, maps, x_cls, y, n = p.x_rgb, p.x_ae, p.maps, p.x_cls, p.y, p.n_train
    ae_export, t_ae = p.ae_export, p.ae_seconds

    t0 = time.monotonic()
    classifier, history = train_classifier(x_cls[:n], y[:n], len(classes), opts, x_cls[n:], y[n:])
    t_cls = time.monotonic() - t0

    out = opts.out
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cls_export = ClassifierExport(classifier, AE_POOL).eval()
    cls_inputs = (INPUT_NAME, "anomaly_map")
    temperature = fit_temperature(served_probabilities(cls_export, x_rgb[n:], maps[n:]), y[n:].numpy())
    say(f"classifier temperature {temperature.value:.3g} from {temperature.images} validation images "
         f"(negative log-likelihood {temperature.nll_before:.3f} → {temperature.nll_after:.3f})")
    export_onnx(cls_export, (x_rgb[:1], maps[:1]), tmp / "classifier.onnx", cls_inputs, "probabilities")
    export_onnx(ae_export, (x_ae[:1],), tmp / "autoencoder.onnx", (INPUT_NAME,), "anomaly_map")
    parity_cls = check_parity(cls_export, tmp / "classifier.onnx", cls_inputs, "probabilities",
                              (x_rgb[:4], maps[:4]), atol=1e-4)
    # The map is in z-score units of good bottles' error (thresholds are about 5): the order in
    # which float32 convolutions accumulate moves it by about 1e-3 between backends, 500× below
    # anything a threshold could notice, while a wrong export moves it by whole units.
    parity_ae = check_parity(ae_export, tmp / "autoencoder.onnx", (INPUT_NAME,), "anomaly_map", (x_ae[:4],),
                             atol=1e-2)
    say(f"exported ONNX; max |torch − ONNX Runtime|: classifier {parity_cls:.1e}, autoencoder {parity_ae:.1e}")

    version = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    manifest = Manifest(
        name=opts.name,
        version=version,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        classes=classes,
        canonical_size=CANONICAL_SIZE,
        view=view,
        inputs=inputs,
        models={
            "classifier": ModelFile(file="classifier.onnx", arch=arch_name(opts.backbone, opts.input_view),
                                    inputs=cls_inputs, output="probabilities", rotations=CLASSIFIER_ROTATIONS),
            "autoencoder": ModelFile(file="autoencoder.onnx",
                                     arch=arch_name(DRAEM_ARCH if opts.anomaly_model == "draem"
                                                           else AUTOENCODER_ARCH, opts.input_view),
                                     inputs=(INPUT_NAME,), output="anomaly_map"),
        },
        anomaly=AnomalyManifest(smoothing_sigma=SMOOTHING_SIGMA, top_k_fraction=TOP_K_FRACTION,
                                mask_radius=MASK_RADIUS, threshold=float("inf"), threshold_method="uncalibrated"),
        decision=DecisionManifest(class_confidence=0.5, defect_rule=DEFECT_SUM, temperature=temperature.value),
        files=checksums(tmp, ["classifier.onnx", "autoencoder.onnx"]),
    )
    write_manifest(tmp, manifest)

    if p.crossfit is not None:
        # Each good training image scored by the fold model that never trained on it, with the serving
        # code's smoothing and top-k (the maps from torch, which the export check holds to ONNX).
        cal_items = split.autoencoder_train
        cal_scores = p.crossfit.scores
    else:
        # Calibrate with the serving code itself, on good images neither model trained on.
        cal_items = split.calibration
        cal_scores = anomaly_scores(Pipeline(load_bundle(tmp)), _frames(cal_items, root))
    if p.crossfit is not None:
        unit, threshold, method = crossfit_threshold(cal_scores, opts.target_false_reject, opts.cross_fit_folds)
    else:
        threshold, method = choose_threshold(cal_scores, opts.target_false_reject)
        unit = threshold
    write_scores(tmp, cal_scores, threshold, method, [i.path.relative_to(root).as_posix() for i in cal_items])
    (tmp / "split.json").write_text(json.dumps(_split_record(split, root), indent=2), encoding="utf-8")

    counts = {c: sum(1 for i in split.train if i.label == c) for c in classes}
    support = classifier_support(cal_scores, counts)
    if support.warning:
        say(f"warning: {support.warning}")
    # The map classifier's features are relative to the threshold, so it is fitted once that is chosen,
    # and the bundle the held-out split is judged on below serves it.
    decision_update: dict[str, Any] = {"classes_from": opts.classes_from}
    if opts.classes_from != "cnn":
        decision_update["map_classifier"] = fit_map_classifier(tmp, split.train, unit, classes)
    manifest = manifest.model_copy(update={
        "anomaly": manifest.anomaly.model_copy(update={
            "threshold": threshold, "threshold_method": method, "calibration_scores": SCORES_FILE}),
        "decision": manifest.decision.model_copy(update=decision_update)})
    write_manifest(tmp, Manifest.model_validate(manifest.model_dump()))

    # Evaluate the held-out split through the serving pipeline at the chosen threshold.
    pipeline = Pipeline(load_bundle(tmp), anomaly_threshold=threshold, classifier_min_anomaly=support.value)
    collector = ReplayCollector(classes)
    defect_scores: list[float] = []
    for frame in _frames(split.holdout, root):
        verdict = pipeline.process(frame)
        collector(verdict, {})
        if frame.label != GOOD and verdict.decision is not None:
            defect_scores.append(verdict.decision.anomaly_score)
    holdout = collector.summary().get("labelled", {})
    # How far the lowest held-out defect sits above the threshold: below 1.2 the anomaly check alone
    # is one bright bottle away from passing a defect, or one dull defect away from missing it.
    lowest_defect = min(defect_scores) if defect_scores else None
    margin = lowest_defect / threshold if lowest_defect is not None and threshold > 0 else None
    if margin is not None and margin < MARGIN_WARN:
        say(f"warning: the lowest held-out defect scores {lowest_defect:.4g}, {margin:.2f}× the threshold "
             f"{threshold:.4g} (under {MARGIN_WARN}×): the anomaly check alone separates them narrowly; "
             "more good images, more --ae-steps or station calibrate on the line's own good bottles")
    metrics = {
        "holdout_images": holdout.get("n"),
        "validation_accuracy": history.get("best_val_accuracy"),
        "holdout_accuracy": holdout.get("accuracy"),
        "holdout_recall": {k: v["recall"] for k, v in holdout.get("per_class", {}).items()},
        "holdout_image_auroc": holdout.get("image_auroc"),
        "holdout_defects_rejected": holdout.get("defects_rejected"),
        "holdout_good_passed": holdout.get("good_passed"),
        "holdout_anomaly_margin": margin,
        "holdout_lowest_defect_score": lowest_defect,
        "onnx_parity_max_abs": {"classifier": parity_cls, "autoencoder": parity_ae},
        "training_seconds": {"classifier": round(t_cls, 1), "autoencoder": round(t_ae, 1),
                             "total": round(time.monotonic() - started, 1)},
    }
    manifest = manifest.model_copy(update={
        "decision": manifest.decision.model_copy(update={
            "classifier_min_anomaly": support.value, "classifier_min_anomaly_quantile": support.quantile,
            "classifier_min_anomaly_method": support.method}),
        "training": {
            "data_root": str(root.resolve()),
            "data_fingerprint": fingerprint(root, pool),
            "split": "split.json",
            "counts": counts,
            "temperature_fit": {"validation_images": temperature.images, "nll_before": temperature.nll_before,
                                "nll_after": temperature.nll_after},
            "seed": opts.seed,
            "epochs": opts.epochs,
            "ae_steps": opts.ae_steps,
            "anomaly_model": opts.anomaly_model,
            "cross_fit_folds": opts.cross_fit_folds if p.crossfit is not None else None,
            "device": opts.device,
            "batch_size": opts.batch_size,
            "lr": opts.lr,
            "optimizer": opts.optimizer,
            "backbone": opts.backbone,
            "pretrained": str(opts.pretrained) if opts.pretrained else None,
            "balance": opts.balance,
            "classifier_selection": history,
            "torch": torch.__version__,
        },
        "metrics": metrics,
        # Drift watch's reference (station/core/drift.py): the good images measured by the serving code.
        "drift": drift_reference(pipeline, [i.path for i in pool if i.label == GOOD],
                                 [i.path for i in split.holdout if i.label == GOOD], cal_scores, threshold),
        "files": checksums(tmp, ["classifier.onnx", "autoencoder.onnx", "split.json", SCORES_FILE]
                           + ([FEATURES_FILE] if opts.classes_from != "cnn" else [])),
    })
    write_manifest(tmp, manifest)
    load_bundle(tmp)  # the bundle we hand over must load
    swap_in_dir(tmp, out)
    say(f"holdout: accuracy {metrics['holdout_accuracy']}, image AUROC {metrics['holdout_image_auroc']}, "
         f"threshold {threshold:.5f}; total {metrics['training_seconds']['total']} s")
    return manifest
