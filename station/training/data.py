"""Labelled data for training: the stratified split, and tensors made by THE preprocess function."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from station.core.folders import GOOD, LabelledImage, labelled_pool
from station.core.imageio import read_image
from station.core.preprocess import ModelInputs, PreprocessSpec, preprocess
from station.errors import DatasetError, FrameError

HOLDOUT_FRACTION = 0.2
VALIDATION_FRACTION = 0.15


@dataclass
class Split:
    train: list[LabelledImage]
    holdout: list[LabelledImage]
    #: good images of the training split kept away from the autoencoder, for the threshold
    calibration: list[LabelledImage]
    #: images of the training split kept away from the classifier, to choose its best epoch
    validation: list[LabelledImage]

    @property
    def classifier_train(self) -> list[LabelledImage]:
        val = {i.path for i in self.validation}
        return [i for i in self.train if i.path not in val]

    @property
    def autoencoder_train(self) -> list[LabelledImage]:
        cal = {i.path for i in self.calibration}
        return [i for i in self.train if i.label == GOOD and i.path not in cal]


def stratified_split(pool: list[LabelledImage], classes: tuple[str, ...], seed: int,
                     keep_calibration: bool = True) -> Split:
    """80/20 per class (as in the reference study), deterministic under ``seed``.

    ``keep_calibration``: keep 20 % of the training split's good images from the anomaly model for its
    threshold; without (cross-fitting scores them out of sample instead), they all train it.
    """
    rng = np.random.default_rng(seed)
    train: list[LabelledImage] = []
    holdout: list[LabelledImage] = []
    for cls in classes:
        items = [i for i in pool if i.label == cls]
        order = rng.permutation(len(items))
        n_hold = round(len(items) * HOLDOUT_FRACTION) if len(items) >= 2 else 0
        n_hold = max(n_hold, 1) if len(items) >= 2 else 0
        holdout += [items[k] for k in order[:n_hold]]
        train += [items[k] for k in order[n_hold:]]
    goods = [i for i in train if i.label == GOOD]
    order = rng.permutation(len(goods))
    n_cal = max(2, round(len(goods) * HOLDOUT_FRACTION))
    calibration = [goods[k] for k in order[:n_cal]] if keep_calibration else []
    validation: list[LabelledImage] = []
    for cls in classes:
        items = [i for i in train if i.label == cls]
        if len(items) >= 4:
            order = rng.permutation(len(items))
            validation += [items[k] for k in order[: max(1, round(len(items) * VALIDATION_FRACTION))]]
    return Split(train, holdout, calibration, validation)


def discover(bottle_dir: Path, classes: tuple[str, ...]) -> list[LabelledImage]:
    if not bottle_dir.is_dir():
        raise DatasetError(f"training data {bottle_dir} does not exist or is not a folder")
    pool = labelled_pool(bottle_dir, classes)
    counts = {c: sum(1 for i in pool if i.label == c) for c in classes}
    missing = [c for c, n in counts.items() if n < 2]
    if missing:
        raise DatasetError(
            f"{bottle_dir}: need at least 2 images of each class in MVTec layout "
            f"(train/good, test/<class>); too few for: {', '.join(missing)} (found {counts})"
        )
    goods = counts.get(GOOD, 0)
    if goods < 8:
        raise DatasetError(f"{bottle_dir}: need at least 8 good images (train/good and test/good together) "
                           f"to train the autoencoder and calibrate its threshold, found {goods}")
    return pool


def fingerprint(root: Path, items: list[LabelledImage]) -> str:
    """sha256 over every file's path and content: which exact data made this bundle."""
    h = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.path.as_posix()):
        h.update(item.path.relative_to(root).as_posix().encode())
        h.update(item.label.encode())
        h.update(hashlib.sha256(item.path.read_bytes()).digest())
    return h.hexdigest()


def load_inputs(path: Path, spec: PreprocessSpec) -> ModelInputs:
    """The exact tensors the station would feed the models for this file."""
    try:
        return preprocess(read_image(path), spec)
    except FrameError as exc:
        raise DatasetError(f"{path}: {exc.detail}") from exc


def tensors(items: list[LabelledImage], spec: PreprocessSpec, classes: tuple[str, ...]) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]:
    """Classifier inputs, autoencoder inputs and class indices for ``items``, in order."""
    cls_inputs, ae_inputs, labels = [], [], []
    for item in items:
        inputs = load_inputs(item.path, spec)
        cls_inputs.append(torch.from_numpy(inputs.classifier[0]))
        ae_inputs.append(torch.from_numpy(inputs.autoencoder[0]))
        labels.append(classes.index(item.label))
    return torch.stack(cls_inputs), torch.stack(ae_inputs), torch.tensor(labels, dtype=torch.long)
