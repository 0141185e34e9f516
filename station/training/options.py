"""`station train`'s options, and the constants every training stage shares (view, inputs, scoring)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from station.core.preprocess import RADIUS_MARGIN as RADIUS_MARGIN
from station.core.preprocess import Lighting
from station.errors import DatasetError

CANONICAL_SIZE = 900
ANGLE_BINS = 512
RADIUS_BINS = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The image score: the mean of the top 4 bins of the 256 × 64 map after a σ = 0.5 Gaussian. A stain
#: or crack covers a few bins; a larger top fraction after a wider blur averages them with glass and
#: lets novel defects score like good bottles (docs/models.md, "Scoring on fewer bins"). Bundles keep
#: the values they were calibrated with.
SMOOTHING_SIGMA = 0.5
TOP_K_FRACTION = 0.00025
#: The rim's enclosing circle is the outer edge of the glass; a little beyond it for a located circle
#: that is off by a few pixels, and the rest of the polar view's margin (1.08) is background.
MASK_RADIUS = 1.03
#: Serving averages the classifier over the bottle turned 0° and 180° (one batch of 2): more accurate
#: than one view, and more turns cost classifier time for little more (docs/models.md, "Figures").
CLASSIFIER_ROTATIONS = 2
BALANCE_MODES = ("weighted", "sampler", "logit-adjust", "none")
AE_POOL = 2
ANOMALY_MODELS = ("draem", "autoencoder")
#: good training images split into this many folds; each image's threshold score comes from the
#: model of its fold, trained on the others
CROSS_FIT_FOLDS = 2
#: a fold model trains this fraction of the served model's steps. All of them: at half, the fold models
#: were rougher than the model they stand in for, their scores of good bottles spread wider and the
#: threshold followed (a dome-lit line's 26.9 against 21.1, where the served model scored new good bottles
#: at most 8.9; docs/models.md, "Calibration")
CROSS_FIT_STEPS = 1.0
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
    #: in the bundle, decided per frame, when they differ); "per-frame": auto in the bundle whatever the
    #: training images show (a model meant for lines lit either way)
    lighting: Lighting | Literal["per-frame"] = "auto"
    #: what both networks see of the polar view (station.training.nets.INPUT_VIEWS)
    input_view: str = "residual"
    #: where the served class probabilities come from (station.core.bundle.CLASS_SOURCES): "map", the
    #: map classifier (the default: it named 92.5 % of a dome-lit line's bottles right where the CNN
    #: named 75 %, docs/models.md), "cnn" or "fused"; the CNN is trained and kept in the bundle either way
    classes_from: str = "map"

    @property
    def residual_view(self) -> bool:
        """The residual view and the augmentations that come with it (docs/models.md)."""
        return self.input_view == "residual"


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


def say(msg: str) -> None:
    """Progress for the person running the training: stderr, at once."""
    print(msg, file=sys.stderr, flush=True)
