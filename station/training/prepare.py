"""The data, its split and the trained anomaly model: what every classifier trained on them shares."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from station.core.bundle import InputManifest, ViewManifest, preprocess_spec
from station.core.folders import BOTTLE_CLASSES, LabelledImage
from station.core.preprocess import agreed_lighting
from station.errors import DatasetError
from station.training.anomaly_model import anomaly_maps, fit_anomaly_model
from station.training.crossfit import CrossFit
from station.training.data import Split, discover, load_inputs, stratified_split, tensors
from station.training.nets import evidence
from station.training.options import (
    AE_POOL,
    ANGLE_BINS,
    ANOMALY_MODELS,
    CANONICAL_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RADIUS_BINS,
    RADIUS_MARGIN,
    TrainOptions,
    say,
)


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
                        interpolation="area-block",
                        lighting="auto" if opts.lighting == "per-frame" else opts.lighting)
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
    say(f"lighting {view.lighting} (--lighting {opts.lighting})")
    say(f"data {root}: {len(pool)} labelled images; train {len(split.train)} (classifier "
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
    fit = fit_anomaly_model(x_ae, opts)
    ae_export, crossfit = fit.export, fit.crossfit
    oof_maps = {good_rows[r]: m for r, m in fit.held_out_maps.items()}
    maps = anomaly_maps(ae_export, x_ae_all, torch.device("cpu"))
    # The classifier learns what a good bottle's map looks like from maps the anomaly model did not
    # train on, as it will see them in service: with maps of its own training images, every good
    # bottle's map is cleaner than any the line will show, and the classifier learns that any trace
    # of a map means a defect.
    for row, m in oof_maps.items():
        maps[row] = m
    x_cls = torch.cat([x_rgb, evidence(maps, AE_POOL)], dim=1)
    return Prepared(root, pool, split, view, inputs, x_rgb, x_ae, y, len(cls_items), maps, x_cls, ae_export,
                    fit.seconds, crossfit)
