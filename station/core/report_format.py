"""Figures as every report prints them: one percentile method, one way of writing a missing value.

Replay, bench, evaluate and the leave-one-style-out table print the same kinds
of figure; they agree because they use these, not a copy each.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NA = "n/a"


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0-100) by numpy's default linear interpolation; NaN for no values."""
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else float("nan")


def pct(v: float | None, digits: int = 1) -> str:
    """A fraction as a percentage (0.953 → ``95.3 %``); ``n/a`` where there is nothing to measure."""
    return NA if v is None else f"{100 * v:.{digits}f} %"


def num(v: float | None, digits: int = 3) -> str:
    """A figure such as an AUROC to ``digits`` places; ``n/a`` where there is nothing to measure."""
    return NA if v is None else f"{v:.{digits}f}"
