"""`station train`: classifier + autoencoder → ONNX bundle, calibrated and evaluated.

The bundle is written to a temporary folder next to ``--out`` and moved into
place only when complete, so a failed or interrupted training never leaves a
half-written bundle where a station would load it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from station.bundle import (
    AnomalyManifest,
    DecisionManifest,
    InputManifest,
    Manifest,
    ModelFile,
    ViewManifest,
    checksums,
    load_bundle,
    preprocess_spec,
    write_manifest,
)
from station.calibrate import SCORES_FILE, anomaly_scores, choose_threshold, write_scores
from station.frame import Frame
from station.mvtec import BOTTLE_CLASSES, LabelledImage
from station.pipeline import Pipeline
from station.replay import ReplayCollector
from station.sources.folder import load_frame
from station.training.data import Split, discover, fingerprint, stratified_split, tensors
from station.training.export import INPUT_NAME, check_parity, export_onnx
from station.training.nets import (
    AUTOENCODER_ARCH,
    CLASSIFIER_ARCH,
    AutoencoderExport,
    ClassifierExport,
    ConvAutoencoder,
    error_column_stats,
    make_classifier,
)

CANONICAL_SIZE = 900
ANGLE_BINS = 512
RADIUS_BINS = 128
RADIUS_MARGIN = 1.08
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMOOTHING_SIGMA = 1.0
TOP_K_FRACTION = 0.002


@dataclass
class TrainOptions:
    data: Path
    out: Path
    epochs: int = 30
    ae_steps: int = 400
    seed: int = 0
    batch_size: int = 16
    target_false_reject: float = 0.01
    name: str = "bundle"
    threads: int = 0
    lr: float = 1e-3
    ae_lr: float = 2e-3


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _augment(x: torch.Tensor, gen: torch.Generator, photometric: bool) -> torch.Tensor:
    """A bottle turned by any angle, or mirrored, is the same bottle.

    In the polar view (rows are angles) a turn is an exact circular shift of
    rows and a mirror a flip of the row order: no interpolation, no borders.
    """
    out = torch.empty_like(x)
    rows = x.shape[2]
    shifts = torch.randint(0, rows, (len(x),), generator=gen)
    flips = torch.rand(len(x), generator=gen) < 0.5
    for i in range(len(x)):
        xi = torch.roll(x[i], int(shifts[i]), dims=1)
        out[i] = torch.flip(xi, dims=(1,)) if flips[i] else xi
    if photometric:
        gain = 1.0 + (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5) * 0.4
        bias = (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5) * 0.4
        out = out * gain + bias
    return out


def _reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Recompute BN running statistics as an exact average over the training images.

    With a few dozen images, running averages drifting under augmentation and a
    changing learning rate make the eval-mode network predict one class for all.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    model.eval()


def train_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, opts: TrainOptions) -> nn.Module:
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    model = make_classifier(n_classes)
    counts = torch.bincount(y, minlength=n_classes).float().clamp(min=1)
    # Inverse-frequency weights: good bottles outnumber each defect class.
    weights = counts.sum() / (n_classes * counts)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, -(-len(x) // opts.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.lr, total_steps=opts.epochs * steps_per_epoch)
    for epoch in range(opts.epochs):
        t0 = time.monotonic()
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total_loss = 0.0
        correct = 0
        for i in range(0, len(x), opts.batch_size):
            idx = perm[i : i + opts.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a batch of one
                continue
            xb = _augment(x[idx], gen, photometric=True)
            logits = model(xb)
            loss = loss_fn(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        _say(f"classifier epoch {epoch + 1}/{opts.epochs}: loss {total_loss / len(x):.4f}, "
             f"train accuracy {correct / len(x):.3f} ({time.monotonic() - t0:.1f} s)")
    _reestimate_batchnorm(model, x, opts.batch_size)
    return model


def train_autoencoder(x: torch.Tensor, opts: TrainOptions) -> ConvAutoencoder:
    """Train on good images for a fixed number of steps (a few dozen images make epochs meaningless)."""
    torch.manual_seed(opts.seed + 1)
    gen = torch.Generator().manual_seed(opts.seed + 1)
    model = ConvAutoencoder()
    opt = torch.optim.Adam(model.parameters(), lr=opts.ae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=opts.ae_steps)
    batch = min(8, len(x))
    t0 = time.monotonic()
    model.train()
    running = 0.0
    report_every = max(1, opts.ae_steps // 10)
    for step in range(1, opts.ae_steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        z = model.standardise(_augment(x[idx], gen, photometric=False))
        loss = (model(z) - z).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % report_every == 0 or step == opts.ae_steps:
            n = report_every if step % report_every == 0 else step % report_every
            _say(f"autoencoder step {step}/{opts.ae_steps}: L1 {running / n:.4f} ({time.monotonic() - t0:.1f} s)")
            running = 0.0
    model.eval()
    return model


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
    }


def train_bundle(opts: TrainOptions) -> Manifest:
    started = time.monotonic()
    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    classes = BOTTLE_CLASSES
    root = opts.data
    pool = discover(root, classes)
    split = stratified_split(pool, classes, opts.seed)
    view = ViewManifest(angle_bins=ANGLE_BINS, radius_bins=RADIUS_BINS, radius_margin=RADIUS_MARGIN)
    inputs = {
        "classifier": InputManifest(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        "autoencoder": InputManifest(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
    }
    spec = preprocess_spec(CANONICAL_SIZE, view, inputs)
    _say(f"data {root}: {len(pool)} labelled images; train {len(split.train)}, holdout {len(split.holdout)}, "
         f"autoencoder {len(split.autoencoder_train)} good, calibration {len(split.calibration)} good")
    x_cls, _, y = tensors(split.train, spec, classes)
    _, x_ae, _ = tensors(split.autoencoder_train, spec, classes)

    t0 = time.monotonic()
    classifier = train_classifier(x_cls, y, len(classes), opts)
    t_cls = time.monotonic() - t0
    t0 = time.monotonic()
    autoencoder = train_autoencoder(x_ae, opts)
    t_ae = time.monotonic() - t0

    out = opts.out
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cls_export = ClassifierExport(classifier).eval()
    col_mean, col_std = error_column_stats(autoencoder, x_ae)
    ae_export = AutoencoderExport(autoencoder, col_mean, col_std).eval()
    export_onnx(cls_export, x_cls[:1], tmp / "classifier.onnx", "probabilities")
    export_onnx(ae_export, x_ae[:1], tmp / "autoencoder.onnx", "anomaly_map")
    parity_cls = check_parity(cls_export, tmp / "classifier.onnx", "probabilities", x_cls[:4], atol=1e-4)
    parity_ae = check_parity(ae_export, tmp / "autoencoder.onnx", "anomaly_map", x_ae[:4], atol=1e-3)
    _say(f"exported ONNX; max |torch − ONNX Runtime|: classifier {parity_cls:.1e}, autoencoder {parity_ae:.1e}")

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
            "classifier": ModelFile(file="classifier.onnx", arch=CLASSIFIER_ARCH, input=INPUT_NAME,
                                    output="probabilities"),
            "autoencoder": ModelFile(file="autoencoder.onnx", arch=AUTOENCODER_ARCH, input=INPUT_NAME,
                                     output="anomaly_map"),
        },
        anomaly=AnomalyManifest(smoothing_sigma=SMOOTHING_SIGMA, top_k_fraction=TOP_K_FRACTION,
                                threshold=float("inf"), threshold_method="uncalibrated"),
        decision=DecisionManifest(class_confidence=0.5),
        files=checksums(tmp, ["classifier.onnx", "autoencoder.onnx"]),
    )
    write_manifest(tmp, manifest)

    # Calibrate with the serving code itself, on good images neither model trained on.
    pipeline = Pipeline(load_bundle(tmp))
    cal_scores = anomaly_scores(pipeline, _frames(split.calibration, root))
    threshold, method = choose_threshold(cal_scores, opts.target_false_reject)
    write_scores(tmp, cal_scores, threshold, method, [i.path.relative_to(root).as_posix() for i in split.calibration])
    (tmp / "split.json").write_text(json.dumps(_split_record(split, root), indent=2), encoding="utf-8")

    # Evaluate the held-out split through the serving pipeline at the chosen threshold.
    pipeline = Pipeline(load_bundle(tmp), anomaly_threshold=threshold)
    collector = ReplayCollector(classes)
    for frame in _frames(split.holdout, root):
        verdict = pipeline.process(frame)
        collector(verdict, {})
    holdout = collector.summary().get("labelled", {})
    metrics = {
        "holdout_images": holdout.get("n"),
        "holdout_accuracy": holdout.get("accuracy"),
        "holdout_recall": {k: v["recall"] for k, v in holdout.get("per_class", {}).items()},
        "holdout_image_auroc": holdout.get("image_auroc"),
        "holdout_defects_rejected": holdout.get("defects_rejected"),
        "holdout_good_passed": holdout.get("good_passed"),
        "onnx_parity_max_abs": {"classifier": parity_cls, "autoencoder": parity_ae},
        "training_seconds": {"classifier": round(t_cls, 1), "autoencoder": round(t_ae, 1),
                             "total": round(time.monotonic() - started, 1)},
    }
    manifest = manifest.model_copy(update={
        "anomaly": AnomalyManifest(smoothing_sigma=SMOOTHING_SIGMA, top_k_fraction=TOP_K_FRACTION,
                                   threshold=threshold, threshold_method=method,
                                   calibration_scores=SCORES_FILE),
        "training": {
            "data_root": str(root.resolve()),
            "data_fingerprint": fingerprint(root, pool),
            "split": "split.json",
            "counts": {c: sum(1 for i in split.train if i.label == c) for c in classes},
            "seed": opts.seed,
            "epochs": opts.epochs,
            "ae_steps": opts.ae_steps,
            "batch_size": opts.batch_size,
            "lr": opts.lr,
            "torch": torch.__version__,
        },
        "metrics": metrics,
        "files": checksums(tmp, ["classifier.onnx", "autoencoder.onnx", "split.json",
                                 SCORES_FILE]),
    })
    write_manifest(tmp, manifest)
    load_bundle(tmp)  # the bundle we hand over must load
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    _say(f"holdout: accuracy {metrics['holdout_accuracy']}, image AUROC {metrics['holdout_image_auroc']}, "
         f"threshold {threshold:.5f}; total {metrics['training_seconds']['total']} s")
    return manifest
