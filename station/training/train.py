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

from station.core.anomaly import AnomalyParams, image_score, smooth
from station.core.bundle import (
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
from station.core.drift import drift_reference
from station.core.folders import BOTTLE_CLASSES, GOOD, LabelledImage
from station.core.frame import Frame
from station.core.pipeline import Pipeline
from station.core.preprocess import Lighting, agreed_lighting
from station.errors import DatasetError
from station.service.replay import ReplayCollector
from station.sources.folder import load_frame
from station.tools.calibrate import SCORES_FILE, anomaly_scores, choose_threshold, write_scores
from station.training.anomalies import simulate
from station.training.augment import mouth_jitter
from station.training.crossfit import CrossFit, cross_fit
from station.training.data import Split, discover, fingerprint, load_inputs, stratified_split, tensors
from station.training.decision import classifier_support, fit_temperature
from station.training.export import INPUT_NAME, check_parity, export_onnx
from station.training.nets import (
    AUTOENCODER_ARCH,
    DRAEM_ARCH,
    AutoencoderExport,
    ClassifierExport,
    ConvAutoencoder,
    DraemExport,
    DraemModel,
    error_column_stats,
    evidence,
    make_classifier,
)

CANONICAL_SIZE = 900
ANGLE_BINS = 512
RADIUS_BINS = 128
RADIUS_MARGIN = 1.08
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The image score: the mean of the top 4 bins of the 256 × 64 map after a σ = 0.5 Gaussian. A stain
#: or crack of the judged novel set covers a few bins, and the former top 0.2 % (33 bins) after σ = 1
#: averaged them with glass: novel AUROC vs good 0.896 then, 0.968 now, on the same maps (seed 2),
#: every trained class still 1.000 (docs/models.md). Bundles keep the values they were calibrated with.
SMOOTHING_SIGMA = 0.5
TOP_K_FRACTION = 0.00025
#: The rim's enclosing circle is the outer edge of the glass; a little beyond it for a located circle
#: that is off by a few pixels, and the rest of the polar view's margin (1.08) is background.
MASK_RADIUS = 1.03
#: Serving averages the classifier over the bottle turned 0° and 180° (one batch of 2): on the two
#: independent 120-image sets, 4-class accuracy 94.2 / 95.8 % → 95.8 / 95.8 %; 4 turns gave 95.8 / 96.7 %
#: for twice the classifier time again.
CLASSIFIER_ROTATIONS = 2
BALANCE_MODES = ("weighted", "sampler", "logit-adjust", "none")
AE_POOL = 2
ANOMALY_MODELS = ("draem", "autoencoder")
#: good training images split into this many folds; each image's threshold score comes from the
#: model of its fold, trained on the others
CROSS_FIT_FOLDS = 2
#: a fold model trains this fraction of the served model's steps
CROSS_FIT_STEPS = 0.5
#: train warns when the lowest held-out defect scores under this many times the threshold
MARGIN_WARN = 1.2


@dataclass
class TrainOptions:
    data: Path
    out: Path
    epochs: int = 60
    ae_steps: int = 1000
    seed: int = 0
    batch_size: int = 16
    target_false_reject: float = 0.01
    name: str = "bundle"
    threads: int = 0
    lr: float = 1e-3
    ae_lr: float = 2e-3
    backbone: str = "mobilenet_v3_small"
    pretrained: Path | None = None
    optimizer: str = "adamw"  # adamw | adam | rmsprop | sgd
    #: class imbalance: "weighted" (inverse-frequency loss weights), "sampler" (class-balanced
    #: batches), "logit-adjust" (Menon et al. 2021: log class priors added to the logits
    #: during training), "none"
    balance: str = "logit-adjust"
    #: "autoencoder": the reconstruction autoencoder (the default: measured better so far, docs/models.md);
    #: "draem": the autoencoder restores bottles from simulated anomalies and a head segments them
    anomaly_model: str = "autoencoder"
    #: folds for the threshold's out-of-sample good scores; below 2, a held-out calibration split
    cross_fit_folds: int = CROSS_FIT_FOLDS
    #: torch device the networks train on ("cpu", "cuda", "cuda:1"); resolve "auto" with pick_device
    device: str = "cpu"
    #: how the mouth is lit: "front", "back", or "auto": the one every image is located under (or auto
    #: in the bundle, decided per frame, when they differ)
    lighting: Lighting = "auto"


def pick_device(wanted: str) -> str:
    """``auto``: CUDA where torch sees a GPU, else the CPU; ``cuda`` without one is an error naming why."""
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise DatasetError(f"--device {wanted}: torch {torch.__version__} sees no CUDA GPU "
                           f"(built with CUDA {torch.version.cuda or 'none'})")
    if wanted != "cpu" and not wanted.startswith("cuda"):
        raise DatasetError(f"--device {wanted!r}: choose auto, cpu or cuda")
    return wanted


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _augment(x: torch.Tensor, gen: torch.Generator, photometric: bool) -> torch.Tensor:
    """A bottle turned by any angle, or mirrored, is the same bottle.

    In the polar view (rows are angles) a turn is an exact circular shift of
    rows and a mirror a flip of the row order: no interpolation, no borders.
    With ``photometric`` (the classifier), also the mouth located a little off
    (station/training/augment.py) and the lighting and sensor varied.
    """
    if photometric:
        x = mouth_jitter(x, gen, RADIUS_MARGIN)
    out = torch.empty_like(x)
    rows = x.shape[2]
    shifts = torch.randint(0, rows, (len(x),), generator=gen)
    flips = torch.rand(len(x), generator=gen) < 0.5
    for i in range(len(x)):
        xi = torch.roll(x[i], int(shifts[i]), dims=1)
        out[i] = torch.flip(xi, dims=(1,)) if flips[i] else xi
    if photometric:  # brightness, contrast and colour of the RGB channels, then sensor noise
        gain = 1.0 + (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5) * 0.4
        colour = 1.0 + (torch.rand(len(x), 3, 1, 1, generator=gen) - 0.5) * 0.2
        bias = (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5) * 0.4
        noise = torch.randn(out[:, :3].shape, generator=gen) * 0.05
        out[:, :3] = out[:, :3] * gain * colour + bias + noise
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
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size].to(device))
    model.eval()


def _optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    raise DatasetError(f"unknown optimiser {name!r}; choose adamw, adam, rmsprop or sgd")


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy


def train_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, opts: TrainOptions,
                     x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None) -> tuple[
    nn.Module, dict[str, Any]
]:
    """Train; keep the epoch with the best validation accuracy (then loss), BN statistics re-estimated."""
    if opts.balance not in BALANCE_MODES:
        raise DatasetError(f"unknown balance mode {opts.balance!r}; choose {', '.join(BALANCE_MODES)}")
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    device = torch.device(opts.device)
    model = make_classifier(opts.backbone, n_classes, pretrained=opts.pretrained).to(device)
    counts = torch.bincount(y, minlength=n_classes).float().clamp(min=1)
    prior = counts / counts.sum()
    weights = counts.sum() / (n_classes * counts) if opts.balance == "weighted" else None
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    logit_bias = torch.log(prior).to(device) if opts.balance == "logit-adjust" else None
    # Class-balanced sampling draws each image with probability ∝ 1 / its class's count.
    sample_p = (1.0 / counts)[y] if opts.balance == "sampler" else None
    opt = _optimizer(opts.optimizer, model.parameters(), opts.lr)
    steps_per_epoch = max(1, -(-len(x) // opts.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.lr, total_steps=opts.epochs * steps_per_epoch)
    best: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: dict[str, Any] = {"best_epoch": None, "best_val_accuracy": None, "best_val_loss": None}
    for epoch in range(opts.epochs):
        t0 = time.monotonic()
        model.train()
        if sample_p is not None:
            perm = torch.multinomial(sample_p, len(x), replacement=True, generator=gen)
        else:
            perm = torch.randperm(len(x), generator=gen)
        total_loss = 0.0
        correct = 0
        seen = 0
        for i in range(0, len(x), opts.batch_size):
            idx = perm[i : i + opts.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a batch of one
                continue
            target = y[idx].to(device)
            logits = model(_augment(x[idx], gen, photometric=True).to(device))
            train_logits = logits + logit_bias if logit_bias is not None else logits
            loss = loss_fn(train_logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == target).sum())
            seen += len(idx)
        msg = (f"classifier epoch {epoch + 1}/{opts.epochs}: loss {total_loss / max(seen, 1):.4f}, "
               f"train accuracy {correct / max(seen, 1):.3f}")
        if x_val is not None and y_val is not None and len(x_val):
            _reestimate_batchnorm(model, x, opts.batch_size)
            val_loss, val_acc = _evaluate(model, x_val.to(device), y_val.to(device))
            msg += f", validation accuracy {val_acc:.3f} loss {val_loss:.4f}"
            if best is None or (val_acc, -val_loss) > best:
                best = (val_acc, -val_loss)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                history.update(best_epoch=epoch + 1, best_val_accuracy=val_acc, best_val_loss=val_loss)
        _say(f"{msg} ({time.monotonic() - t0:.1f} s)")
    if best_state is not None:
        model.load_state_dict(best_state)
        _say(f"classifier: keeping epoch {history['best_epoch']} (validation accuracy "
             f"{history['best_val_accuracy']:.3f})")
    else:
        _reestimate_batchnorm(model, x, opts.batch_size)
    model.eval()
    return model.cpu(), history


def train_autoencoder(x: torch.Tensor, opts: TrainOptions, steps: int | None = None, seed_offset: int = 0,
                      label: str = "autoencoder") -> ConvAutoencoder:
    """Train on good images for a fixed number of steps (a few dozen images make epochs meaningless)."""
    steps = opts.ae_steps if steps is None else steps
    device = torch.device(opts.device)
    torch.manual_seed(opts.seed + 1 + seed_offset)
    gen = torch.Generator().manual_seed(opts.seed + 1 + seed_offset)
    model = ConvAutoencoder().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=opts.ae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    batch = min(8, len(x))
    t0 = time.monotonic()
    model.train()
    running = 0.0
    report_every = max(1, steps // 10)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        z = model.standardise(_augment(x[idx], gen, photometric=False).to(device))
        loss = (model(z) - z).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % report_every == 0 or step == steps:
            n = report_every if step % report_every == 0 else step % report_every
            _say(f"{label} step {step}/{steps}: L1 {running / n:.4f} ({time.monotonic() - t0:.1f} s)")
            running = 0.0
    model.eval()
    return model


def _focal_dice(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017, as DRAEM trains its head) plus a soft Dice term.

    Anomalous bins are a fraction of a percent of a bottle: plain cross-entropy
    is content to call everything good. Focal loss down-weights the easy good
    bins; Dice scores the overlap of the few anomalous ones.
    """
    p = torch.sigmoid(logits)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    focal = ((1 - p_t) ** gamma * bce).mean()
    inter = (p * target).sum(dim=(1, 2, 3))
    denom = (p + target).sum(dim=(1, 2, 3))
    has = target.sum(dim=(1, 2, 3)) > 0
    dice = 1 - (2 * inter + 1) / (denom + 1)
    dice_loss = dice[has].mean() if bool(has.any()) else logits.sum() * 0
    return focal * 10 + dice_loss


def train_anomaly_model(x: torch.Tensor, opts: TrainOptions, steps: int | None = None, seed_offset: int = 0,
                        label: str = "anomaly model") -> DraemModel:
    """DRAEM on good images ``x`` (raw polar views): restore the bottle from an input with simulated
    anomalies pasted in (station/training/anomalies.py), and find where they were."""
    steps = opts.ae_steps if steps is None else steps
    torch.manual_seed(opts.seed + 1 + seed_offset)
    gen = torch.Generator().manual_seed(opts.seed + 1 + seed_offset)
    device = torch.device(opts.device)
    model = DraemModel().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=opts.ae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    batch = min(8, len(x))
    rim_col = round(x.shape[3] / RADIUS_MARGIN)
    pool = nn.MaxPool2d(AE_POOL)
    t0 = time.monotonic()
    model.train()
    running = [0.0, 0.0]
    report_every = max(1, steps // 10)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        # Half the bottle's turn per image: a turned bottle is a circular shift of rows, so after the
        # random turn the first half is a random half; it halves the cost of a step.
        clean = _augment(x[idx], gen, photometric=False)[:, :, : x.shape[2] // 2]
        anomalous, mask = simulate(clean, gen, rim_col)
        target_z = model.autoencoder.standardise(clean.to(device))
        _, restored, logits = model(anomalous.to(device))
        rec_loss = (restored - target_z).abs().mean()
        seg_loss = _focal_dice(logits, pool(mask.to(device)))
        loss = rec_loss + seg_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running[0] += rec_loss.item()
        running[1] += seg_loss.item()
        if step % report_every == 0 or step == steps:
            n = report_every if step % report_every == 0 else step % report_every
            _say(f"{label} step {step}/{steps}: restore L1 {running[0] / n:.4f}, segment {running[1] / n:.4f} "
                 f"({time.monotonic() - t0:.1f} s)")
            running = [0.0, 0.0]
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
        "validation": rows(split.validation),
    }


@dataclass
class Prepared:
    """Data, split and the trained autoencoder: everything the classifier's training needs."""

    root: Path
    pool: list[LabelledImage]
    split: Split
    view: ViewManifest
    inputs: dict[str, InputManifest]
    x_rgb: torch.Tensor  # classifier-train then validation images, RGB polar views
    x_ae: torch.Tensor  # the autoencoder's good training images
    y: torch.Tensor
    n_train: int  # the first n_train rows train the classifier, the rest validate it
    maps: torch.Tensor  # anomaly maps of x_rgb's images
    x_cls: torch.Tensor  # x_rgb with the anomaly map as 4th channel
    ae_export: nn.Module
    ae_seconds: float
    #: out-of-sample scores of the anomaly model's good training images (None: a calibration split instead)
    crossfit: CrossFit | None = None

    def holdout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier inputs (with evidence) and labels of the held-out split."""
        spec = preprocess_spec(CANONICAL_SIZE, self.view, self.inputs)
        x_rgb, x_ae, y = tensors(self.split.holdout, spec, BOTTLE_CLASSES)
        with torch.no_grad():
            maps = self.ae_export(x_ae)
        return torch.cat([x_rgb, evidence(maps, AE_POOL)], dim=1), y


def served_probabilities(cls_export: nn.Module, x_rgb: torch.Tensor, maps: torch.Tensor) -> Any:
    """Class probabilities as the station computes them: averaged over the bottle's turns (NumPy)."""
    if len(x_rgb) == 0:
        return torch.zeros((0, len(BOTTLE_CLASSES))).numpy()
    def turned(x: torch.Tensor, k: int) -> torch.Tensor:  # as Inspector.classifier_batches turns it
        return torch.roll(x, k * x.shape[2] // CLASSIFIER_ROTATIONS, dims=2)

    with torch.no_grad():
        probs = [cls_export(turned(x_rgb, k), turned(maps, k)) for k in range(CLASSIFIER_ROTATIONS)]
    return torch.stack(probs).mean(0).numpy()


def _anomaly_params() -> AnomalyParams:
    return AnomalyParams(SMOOTHING_SIGMA, TOP_K_FRACTION, MASK_RADIUS, RADIUS_MARGIN)


def anomaly_maps(export: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 16) -> torch.Tensor:
    """The exported model's maps for raw polar views ``x``, on the CPU."""
    with torch.no_grad():
        return torch.cat([export(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


def map_scores(maps: torch.Tensor) -> list[float]:
    """Image scores of maps, by the serving code's own smoothing and top-k (station/core/anomaly.py)."""
    params = _anomaly_params()
    return [image_score(smooth(m[0].numpy(), params), params) for m in maps]


def _train_anomaly_export(x: torch.Tensor, opts: TrainOptions, steps: int, seed_offset: int, label: str
                          ) -> nn.Module:
    device = torch.device(opts.device)
    if opts.anomaly_model == "autoencoder":
        autoencoder = train_autoencoder(x, opts, steps, seed_offset, label)
        col_mean, col_std = error_column_stats(autoencoder, x.to(device))
        return AutoencoderExport(autoencoder, col_mean, col_std).eval()
    return DraemExport(train_anomaly_model(x, opts, steps, seed_offset, label)).eval()


def prepare(opts: TrainOptions) -> Prepared:
    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if opts.anomaly_model not in ANOMALY_MODELS:
        raise DatasetError(f"unknown anomaly model {opts.anomaly_model!r}; choose {', '.join(ANOMALY_MODELS)}")
    device = torch.device(opts.device)
    classes = BOTTLE_CLASSES
    root = opts.data
    pool = discover(root, classes)
    split = stratified_split(pool, classes, opts.seed, keep_calibration=opts.cross_fit_folds < 2)
    view = ViewManifest(angle_bins=ANGLE_BINS, radius_bins=RADIUS_BINS, radius_margin=RADIUS_MARGIN,
                        interpolation="area-block", lighting=opts.lighting)
    inputs = {
        "classifier": InputManifest(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        "autoencoder": InputManifest(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
    }
    spec = preprocess_spec(CANONICAL_SIZE, view, inputs)
    if opts.lighting == "auto":
        # When every image is lit one way, the bundle says so: each frame is then located as the
        # training images were, not by a per-frame guess. Mixed data keeps auto.
        lighting = agreed_lighting(load_inputs(item.path, spec).mouth.lighting for item in pool)
        view = view.model_copy(update={"lighting": lighting})
        spec = preprocess_spec(CANONICAL_SIZE, view, inputs)
    _say(f"lighting {view.lighting} (--lighting {opts.lighting})")
    _say(f"data {root}: {len(pool)} labelled images; train {len(split.train)} (classifier "
         f"{len(split.classifier_train)}, validation {len(split.validation)}), holdout {len(split.holdout)}; "
         f"anomaly model {len(split.autoencoder_train)} good"
         + (f", cross-fitted over {opts.cross_fit_folds} folds" if opts.cross_fit_folds >= 2
            else f", calibration {len(split.calibration)} good") + f"; device {device}")
    cls_items = split.classifier_train
    x_rgb, x_ae_all, y = tensors(cls_items + split.validation, spec, classes)
    paths = [i.path for i in cls_items + split.validation]
    good_rows = [paths.index(i.path) for i in split.autoencoder_train]
    x_ae = x_ae_all[torch.tensor(good_rows)]

    # The anomaly model first: its anomaly map is evidence the classifier sees.
    t0 = time.monotonic()
    crossfit: CrossFit | None = None
    oof_maps: dict[int, torch.Tensor] = {}
    if opts.cross_fit_folds >= 2:
        fold_steps = max(1, round(opts.ae_steps * CROSS_FIT_STEPS))

        def fold_model(rows: list[int], fold: int) -> nn.Module:
            return _train_anomaly_export(x_ae[torch.tensor(rows)], opts, fold_steps, 100 + fold,
                                         f"anomaly model, fold {fold + 1}/{opts.cross_fit_folds}")

        def fold_scores(model: nn.Module, rows: list[int]) -> list[float]:
            maps = anomaly_maps(model, x_ae[torch.tensor(rows)], device)
            oof_maps.update({good_rows[r]: m for r, m in zip(rows, maps, strict=True)})
            return map_scores(maps)

        crossfit = cross_fit(len(x_ae), opts.cross_fit_folds, opts.seed, fold_model, fold_scores)
    ae_export = _train_anomaly_export(x_ae, opts, opts.ae_steps, 0, "anomaly model").cpu()
    ae_seconds = time.monotonic() - t0
    maps = anomaly_maps(ae_export, x_ae_all, torch.device("cpu"))
    # The classifier learns what a good bottle's map looks like from maps the anomaly model did not
    # train on, as it will see them in service: with maps of its own training images, every good
    # bottle's map is cleaner than any the line will show, and the classifier learns that any trace
    # of a map means a defect.
    for row, m in oof_maps.items():
        maps[row] = m
    x_cls = torch.cat([x_rgb, evidence(maps, AE_POOL)], dim=1)
    return Prepared(root, pool, split, view, inputs, x_rgb, x_ae, y, len(cls_items), maps, x_cls, ae_export,
                    ae_seconds, crossfit)


def train_bundle(opts: TrainOptions) -> Manifest:
    started = time.monotonic()
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
    _say(f"classifier temperature {temperature.value:.3g} from {temperature.images} validation images "
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
            "classifier": ModelFile(file="classifier.onnx", arch=opts.backbone, inputs=cls_inputs,
                                    output="probabilities", rotations=CLASSIFIER_ROTATIONS),
            "autoencoder": ModelFile(file="autoencoder.onnx",
                                     arch=DRAEM_ARCH if opts.anomaly_model == "draem" else AUTOENCODER_ARCH,
                                     inputs=(INPUT_NAME,), output="anomaly_map"),
        },
        anomaly=AnomalyManifest(smoothing_sigma=SMOOTHING_SIGMA, top_k_fraction=TOP_K_FRACTION,
                                mask_radius=MASK_RADIUS, threshold=float("inf"), threshold_method="uncalibrated"),
        decision=DecisionManifest(class_confidence=0.5, temperature=temperature.value),
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
    threshold, method = choose_threshold(cal_scores, opts.target_false_reject)
    if p.crossfit is not None:
        method = f"cross-fitted over {opts.cross_fit_folds} folds; {method}"
    write_scores(tmp, cal_scores, threshold, method, [i.path.relative_to(root).as_posix() for i in cal_items])
    (tmp / "split.json").write_text(json.dumps(_split_record(split, root), indent=2), encoding="utf-8")

    counts = {c: sum(1 for i in split.train if i.label == c) for c in classes}
    support = classifier_support(cal_scores, counts)
    if support.warning:
        _say(f"warning: {support.warning}")

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
        _say(f"warning: the lowest held-out defect scores {lowest_defect:.4g}, {margin:.2f}× the threshold "
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
        "anomaly": manifest.anomaly.model_copy(update={
            "threshold": threshold, "threshold_method": method, "calibration_scores": SCORES_FILE}),
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
