"""The decision's training-time settings: the classifier's temperature and the anomaly support it needs.

A classifier trained on a few images per class is overconfident and misnames good bottles; the
anomaly model, trained on good bottles only, knows from out-of-sample scores how often a good
bottle scores high. Two settings, both written into the manifest's ``decision``:

- ``temperature``: softens the classifier's probabilities so that its confidence means what it
  says on images it did not train on (Guo et al. 2017, temperature scaling), fitted on the
  validation split. Never below 1: with a handful of validation images, all of them right, the
  likelihood would ask for an ever sharper network.
- ``classifier_min_anomaly``: the anomaly score the classifier alone needs to fail a bottle, the
  ``support_quantile`` of the good images' out-of-sample scores. A good bottle then fails by the
  classifier alone only when the classifier misnames it *and* it is among the share of good
  bottles scoring that high, which bounds the classifier's false rejects whatever its accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: with fewer training images than this in some class, the classifier alone is not trusted: it needs
#: the anomaly check's support (the 90 % quantile of good bottles' scores). With 8 images a class the
#: classifier rejected 40 % of an independent renderer's good bottles (issue 16); with 48 it rejected none.
TRUSTED_PER_CLASS = 30
#: quantile of good out-of-sample anomaly scores the classifier alone needs, below and above that count
SUPPORT_QUANTILE_FEW = 0.9
SUPPORT_QUANTILE_MANY = 0.5
_TEMPERATURES = np.exp(np.linspace(0.0, np.log(20.0), 121))  # 1 … 20


@dataclass(frozen=True)
class Temperature:
    value: float
    nll_before: float  # mean negative log-likelihood of the validation labels at T = 1
    nll_after: float
    images: int


def _nll(probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    logp = np.log(np.clip(probs, 1e-12, None)) / temperature
    logp = logp - logp.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> Temperature:
    """The temperature ≥ 1 that minimises the validation images' negative log-likelihood."""
    if len(labels) == 0:
        return Temperature(1.0, float("nan"), float("nan"), 0)
    nlls = [_nll(probs, labels, float(t)) for t in _TEMPERATURES]
    best = int(np.argmin(nlls))
    return Temperature(float(_TEMPERATURES[best]), nlls[0], nlls[best], len(labels))


@dataclass(frozen=True)
class Support:
    value: float
    quantile: float
    method: str
    warning: str | None  # set when some class has too few images for the classifier to be trusted alone


def classifier_support(good_scores: list[float], counts: dict[str, int]) -> Support:
    """The anomaly score the classifier alone needs, from good out-of-sample scores and the class counts."""
    fewest = min(counts, key=lambda c: counts[c])
    few = counts[fewest] < TRUSTED_PER_CLASS
    q = SUPPORT_QUANTILE_FEW if few else SUPPORT_QUANTILE_MANY
    value = float(np.quantile(np.asarray(good_scores, np.float64), q)) if good_scores else 0.0
    method = (f"{q:.0%} quantile of {len(good_scores)} good anomaly scores; fewest training images of a "
              f"class: {counts[fewest]} ({fewest}), {'under' if few else 'at least'} {TRUSTED_PER_CLASS}")
    warning = None
    if few:
        warning = (f"class {fewest!r} has only {counts[fewest]} training images (under {TRUSTED_PER_CLASS}): "
                   f"the classifier is not trusted alone; it fails a bottle only when the anomaly score is at "
                   f"least {value:.4g}, the {q:.0%} quantile of good bottles' scores. More labelled images "
                   "per class make its class names and rejections trustworthy")
    return Support(value, q, method, warning)
