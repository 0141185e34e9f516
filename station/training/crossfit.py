"""Cross-fitted anomaly scores: every good image scored by a model that never trained on it.

A threshold set on scores of images the model trained on sits too low (the
model has seen them), and one set on a dozen held-out images sits where a
dozen images put it: a log-normal bound on 13 scores spread from 0.9 to 9.5
gave 72 where good bottles of an independent set reached 11. Cross-fitting
gives every good training image an out-of-sample score: the good images are
split into folds, one model is trained per fold on the others, and each
image is scored by the model of its own fold. The served model is trained on
all of them; the fold models only score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from station.tools.calibrate import CONFIDENCE, choose_threshold

M = TypeVar("M")

#: Confidence of the threshold's tolerance bound (station/tools/calibrate.py) when it is set on at least
#: ``POINT_ESTIMATE_FROM`` cross-fitted scores: the fitted quantile itself. The fold models learn from part
#: of the good images, so their scores of good bottles spread wider than the served model's scores of new
#: ones (log-sd 0.63 against 0.54 on the dome line, 0.38 against 0.33 backlit); that excess already covers
#: what the 95 % bound is for, the uncertainty of the spread. With the bound on top the dome threshold sat
#: at 2.4× the highest new good bottle and passed defects the anomaly check had seen (docs/models.md,
#: "Calibration"). Fewer scores keep the 95 % bound: there the spread's uncertainty dominates.
CROSS_FIT_CONFIDENCE = 0.5
POINT_ESTIMATE_FROM = 30


@dataclass
class CrossFit:
    #: out-of-sample score of each image, in input order
    scores: list[float]
    #: the fold each image belongs to (and so the model that scored it)
    fold_of: list[int]
    #: the indices each fold's model trained on
    trained_on: list[list[int]]


def assign_folds(n: int, folds: int, seed: int) -> list[int]:
    """Each of ``n`` images to one of ``folds`` folds, sizes within one, deterministic under ``seed``."""
    if folds < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {folds}")
    if n < folds:
        raise ValueError(f"{n} images cannot fill {folds} folds")
    order = np.random.default_rng(seed).permutation(n)
    fold_of = [0] * n
    for rank, index in enumerate(order):
        fold_of[int(index)] = rank % folds
    return fold_of


def cross_fit(n: int, folds: int, seed: int, train: Callable[[list[int], int], M],
              score: Callable[[M, list[int]], Sequence[float]]) -> CrossFit:
    """``train(indices, fold)`` a model per fold on the other folds' images; ``score(model, indices)`` its own."""
    fold_of = assign_folds(n, folds, seed)
    scores = [0.0] * n  # each image is in exactly one fold, so each is set exactly once below
    trained_on: list[list[int]] = []
    for fold in range(folds):
        inside = [i for i in range(n) if fold_of[i] != fold]
        held = [i for i in range(n) if fold_of[i] == fold]
        model = train(inside, fold)
        trained_on.append(inside)
        for i, value in zip(held, score(model, held), strict=True):
            scores[i] = float(value)
    return CrossFit(scores, fold_of, trained_on)


def threshold_confidence(n_scores: int) -> float:
    """The tolerance bound's confidence for a threshold set on ``n_scores`` cross-fitted good scores."""
    return CROSS_FIT_CONFIDENCE if n_scores >= POINT_ESTIMATE_FROM else CONFIDENCE


def crossfit_threshold(scores: list[float], target_false_reject: float, folds: int) -> tuple[float, float, str]:
    """(unit, threshold, method) from cross-fitted good scores.

    The threshold's confidence follows ``threshold_confidence``; the map classifier's unit is the 95 % bound
    whatever the decision threshold: a scale for its features, the one the classifier was developed and
    measured in (docs/models.md, "The map classifier").
    """
    unit, _ = choose_threshold(scores, target_false_reject)
    threshold, method = choose_threshold(scores, target_false_reject, threshold_confidence(len(scores)))
    return unit, threshold, f"cross-fitted over {folds} folds; {method}"
