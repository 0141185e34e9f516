"""Drift watch: is the line still showing what the bundle was trained on?

Six quantities are measured on every inspected bottle and compared, over a
rolling window, with what the good training images gave (the bundle's
``drift`` section, written by `station train`):

====================  =======================================================  ==========
quantity              per bottle                                               bounded
====================  =======================================================  ==========
``mouth_offset``      located mouth centre's distance from the view centre,    above
                      as a fraction of the canonical side
``mouth_radius``      located rim radius / canonical side                      both sides
``brightness``        mean gray level (0…1) of the polar view the models see   both sides
``contrast``          standard deviation of that view's gray levels (0…1)      both sides
``anomaly_score``     image anomaly score, passing bottles only                above
``good_confidence``   the classifier's probability of ``good``, passing        below
                      bottles only
====================  =======================================================  ==========

Statistic and bound (docs/service.md, "Drift watch", says the same for the
engineer). The window statistic is the median of the last ``window`` values:
a few defective or odd bottles cannot move it, a line that moved moves it
after half a window. The reference is the good training images' own
distribution: its ``tail`` and ``1 − tail`` quantiles (10th and 90th) and a
robust scale ``s`` (1.4826 × the median absolute deviation). A quantity
drifts when the window median leaves the band

    [Q(tail) − z·se,  Q(1 − tail) + z·se],   z = 3,
    se = s · sqrt(π / (2k) + tail(1 − tail) / (n · φ(Φ⁻¹(tail))²)),

k the values in the window, n the reference images. So drift means "the
typical bottle now looks like the outer 10 % of the training set", and the
band is widened by three standard errors of the two things that are estimated:
the window median (π/(2k): the median's sampling variance for k values) and
the reference quantile from n images. Under no drift the window median sits
near the reference median, 1.28 s inside the band even before the widening,
so a clean line does not raise it; a line shifted by ~1.3 s + 3 se does. It is
judged once the window holds a quarter of its length (at least 10 values),
with ``se`` for the values it holds. It clears when the median is back inside
the band narrowed by one ``se`` (hysteresis: a median sitting on the bound
does not flap).

Passing bottles only for the model outputs: failed bottles are what the models
are for, and their scores are not a line's drift. The reference for them is
likewise the passing part: cross-fitted anomaly scores at or below the
threshold, P(good) of held-out good images that passed.

Drift is a warning for the engineer, not a stop: verdicts go on, the state
stays ``running``. This module is on the serving path: no torch.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog

from station.contract.timefmt import iso_utc
from station.core.bundle import DriftManifest, DriftQuantity
from station.core.preprocess import ModelInputs, PreprocessSpec

log = structlog.get_logger("station.drift")

MOUTH_OFFSET = "mouth_offset"
MOUTH_RADIUS = "mouth_radius"
BRIGHTNESS = "brightness"
CONTRAST = "contrast"
ANOMALY_SCORE = "anomaly_score"
GOOD_CONFIDENCE = "good_confidence"

Side = Literal["high", "low", "both"]
#: which way each quantity may drift; the order is the order of reports
SIDES: dict[str, Side] = {
    MOUTH_OFFSET: "high",  # closer to the centre than training is no harm
    MOUTH_RADIUS: "both",
    BRIGHTNESS: "both",
    CONTRAST: "both",
    ANOMALY_SCORE: "high",  # good bottles scoring lower is the models doing better
    GOOD_CONFIDENCE: "low",
}
#: Smallest reference scale per quantity: below what the measurement resolves (2 px of 900 for
#: geometry, one gray level for photometry, 1 % for P(good)), a tight reference (all good bottles
#: at P(good) 0.999) would put the bound inside the noise of the measurement itself.
SCALE_FLOOR: dict[str, float] = {
    MOUTH_OFFSET: 0.002, MOUTH_RADIUS: 0.002, BRIGHTNESS: 1 / 255, CONTRAST: 1 / 255,
    ANOMALY_SCORE: 0.0, GOOD_CONFIDENCE: 0.01,
}
TAIL = 0.10
Z = 3.0
#: fewer reference values than this: the quantity is not watched (its quantiles would be guesses)
MIN_REFERENCE = 5
#: judged once the window holds this fraction of its length, and at least MIN_JUDGED values
JUDGE_FRACTION = 0.25
MIN_JUDGED = 10


@dataclass(frozen=True)
class Sample:
    """What one inspected bottle contributes; the model outputs only when it passed."""

    mouth_offset: float
    mouth_radius: float
    brightness: float
    contrast: float
    anomaly_score: float | None = None
    good_confidence: float | None = None

    def values(self) -> dict[str, float | None]:
        return {MOUTH_OFFSET: self.mouth_offset, MOUTH_RADIUS: self.mouth_radius, BRIGHTNESS: self.brightness,
                CONTRAST: self.contrast, ANOMALY_SCORE: self.anomaly_score, GOOD_CONFIDENCE: self.good_confidence}


def view_measures(inputs: ModelInputs, spec: PreprocessSpec) -> tuple[float, float, float, float]:
    """(mouth offset, mouth radius, brightness, contrast) of one preprocessed bottle.

    Brightness and contrast are read from the autoencoder's input, de-normalised: it is the polar view
    both models see, already computed, so this costs a few hundred microseconds, not another pass
    over the 900 × 900 view. Every fourth angle and second radius (8192 of the view's samples) is enough
    for a mean and a spread.
    """
    size = spec.canonical_size
    m = inputs.mouth
    offset = math.hypot(m.cx - size / 2, m.cy - size / 2) / size
    x = inputs.autoencoder[0, :, ::4, ::2]
    norm = spec.autoencoder
    weights = np.asarray(norm.std, dtype=np.float32) / 3
    gray = np.tensordot(weights, x, axes=1)  # the channels' mean, less the constant mean/3 added below
    return offset, m.radius / size, float(gray.mean()) + sum(norm.mean) / 3, float(gray.std())


# -- reference statistics (built for the bundle by station/tools/drift_reference.py) -----------


def reference(values: Sequence[float], side: Side, source: str, floor: float = 0.0) -> DriftQuantity:
    v = np.asarray(values, dtype=np.float64)
    median = float(np.median(v))
    scale = max(1.4826 * float(np.median(np.abs(v - median))), floor)
    if scale <= 0:  # every value equal and no floor: the smallest step the values could show
        scale = max(abs(median) * 1e-3, 1e-9)
    return DriftQuantity(side=side, n=len(v), median=median, scale=scale,
                         q_low=float(np.quantile(v, TAIL)), q_high=float(np.quantile(v, 1 - TAIL)), source=source)


# -- bounds ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _normal_pdf_at_quantile(p: float) -> float:
    # Φ⁻¹ by bisection: no scipy on the serving path; cached, so once per tail value.
    lo, hi = -10.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            lo = mid
        else:
            hi = mid
    z = (lo + hi) / 2
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def standard_error(ref: DriftQuantity, k: int, tail: float) -> float:
    """Standard error of (window median − reference quantile): k window values, ref.n reference ones."""
    f = _normal_pdf_at_quantile(tail)
    return ref.scale * math.sqrt(math.pi / (2 * k) + tail * (1 - tail) / (ref.n * f * f))


@dataclass(frozen=True)
class Band:
    low: float | None  # None: this side is not bounded
    high: float | None


def band(ref: DriftQuantity, k: int, tail: float, z: float) -> Band:
    """Values outside this band, for a window median of k values, are drift."""
    widen = z * standard_error(ref, k, tail)
    return Band(ref.q_low - widen if ref.side in ("low", "both") else None,
                ref.q_high + widen if ref.side in ("high", "both") else None)


# -- the watch (serving) -----------------------------------------------------------------------


@dataclass
class _Drifting:
    since: float  # wall clock
    bound: float
    side: str


class _Window:
    """The last ``size`` values in a flat array: the median of a contiguous array is a few microseconds,
    of a deque a copy first."""

    def __init__(self, size: int) -> None:
        self._values = np.empty(size, dtype=np.float64)
        self._next = 0
        self.count = 0

    def append(self, value: float) -> None:
        self._values[self._next] = value
        self._next = (self._next + 1) % len(self._values)
        self.count = min(self.count + 1, len(self._values))

    def median(self) -> float:
        return float(np.median(self._values[: self.count]))


class DriftWatch:
    """Rolling windows of every quantity; says (and logs, once each way) which ones drift.

    ``observe`` is called by every inspection worker, ``report``/``snapshot`` by the publishing loop
    and the metrics server: one lock, held for a few medians of ``window`` values.
    """

    def __init__(self, manifest: DriftManifest, window: int, bundle_label: str = "") -> None:
        self.window = window
        self.tail, self.z = manifest.tail, manifest.z
        self.refs = {q: r for q, r in manifest.quantities.items() if q in SIDES}
        unknown = sorted(set(manifest.quantities) - set(SIDES))
        if unknown:  # a newer trainer's quantity: watch what this station knows, say what it skips
            log.warning("drift_quantities_unknown", quantities=unknown)
        self.min_judged = max(MIN_JUDGED, int(window * JUDGE_FRACTION))
        self._values = {q: _Window(window) for q in self.refs}
        self._current: dict[str, float | None] = dict.fromkeys(self.refs)
        self._drifting: dict[str, _Drifting] = {}
        self._raised: dict[str, int] = {}  # how often each quantity started drifting in this watch
        self._lock = threading.Lock()
        full = {q: band(r, window, self.tail, self.z) for q, r in self.refs.items()}
        log.info("drift_watch_on", bundle=bundle_label, window=window, judged_from=self.min_judged,
                 bounds={q: [b.low, b.high] for q, b in full.items()},
                 not_watched=dict(manifest.skipped) or None)

    def observe(self, sample: Sample) -> None:
        now = time.time()
        with self._lock:
            for name, value in sample.values().items():
                if value is None or name not in self.refs or not math.isfinite(value):
                    continue
                values = self._values[name]
                values.append(value)
                if values.count < self.min_judged:
                    continue
                median = values.median()
                self._current[name] = median
                self._judge(name, median, values.count, now)

    def _judge(self, name: str, median: float, k: int, now: float) -> None:
        ref = self.refs[name]
        se = standard_error(ref, k, self.tail)
        b = band(ref, k, self.tail, self.z)
        state = self._drifting.get(name)
        if state is None:
            if b.high is not None and median > b.high:
                state = _Drifting(now, b.high, "high")
            elif b.low is not None and median < b.low:
                state = _Drifting(now, b.low, "low")
            else:
                return
            self._drifting[name] = state
            self._raised[name] = self._raised.get(name, 0) + 1
            log.warning("drift_started", quantity=name, value=round(median, 6), bound=round(state.bound, 6),
                        direction="above" if state.side == "high" else "below", window=k,
                        reference_median=round(ref.median, 6))
            return
        if state.side == "high" and b.high is not None:
            state.bound = b.high
        elif state.side == "low" and b.low is not None:
            state.bound = b.low
        back = median <= state.bound - se if state.side == "high" else median >= state.bound + se
        if back:
            del self._drifting[name]
            log.info("drift_cleared", quantity=name, value=round(median, 6), bound=round(state.bound, 6),
                     lasted_s=round(now - state.since, 1), window=k)

    def _entry(self, name: str, state: _Drifting) -> dict[str, Any]:
        value = self._current[name]
        return {"quantity": name, "value": None if value is None else round(value, 6),
                "bound": round(state.bound, 6), "direction": "above" if state.side == "high" else "below",
                "since": iso_utc(state.since)}

    def _worst_first(self) -> list[str]:
        def excess(name: str) -> float:  # in units of the reference's spread: comparable across quantities
            value = self._current[name]
            return 0.0 if value is None else abs(value - self._drifting[name].bound) / self.refs[name].scale

        return sorted(self._drifting, key=lambda n: (-excess(n), list(SIDES).index(n)))

    def report(self) -> dict[str, Any] | None:
        """The heartbeat's ``drift``: None while nothing drifts, else the worst one and ``quantities``, all."""
        with self._lock:
            if not self._drifting:
                return None
            entries = [self._entry(n, self._drifting[n]) for n in self._worst_first()]
        return {**entries[0], "quantities": entries}

    def snapshot(self) -> dict[str, Any]:
        """Every watched quantity for the metrics: window value, samples, bound, drifting or not."""
        with self._lock:
            out: dict[str, Any] = {}
            for name, ref in self.refs.items():
                k = self._values[name].count
                b = band(ref, max(k, self.min_judged), self.tail, self.z)
                out[name] = {"value": self._current[name], "samples": k, "low": b.low, "high": b.high,
                             "drifting": name in self._drifting}
            return {"window": self.window, "quantities": out, "raised": dict(self._raised)}

    def summary_line(self) -> str:
        """One line for the end of a replay: what drifts now, and what drifted at some point."""
        snap = self.snapshot()
        rep = self.report()
        now = "none" if rep is None else ", ".join(
            f"{e['quantity']} {e['value']:.4g} {'>' if e['direction'] == 'above' else '<'} {e['bound']:.4g}"
            for e in rep["quantities"])
        values = ", ".join(f"{q} {v['value']:.4g}" for q, v in snap["quantities"].items()
                           if v["value"] is not None) or f"none yet (judged from {self.min_judged} bottles)"
        raised = ", ".join(f"{q} ×{n}" for q, n in snap["raised"].items()) or "none"
        return f"drift (window {self.window}): now {now}; raised during the run: {raised}; window medians: {values}"

    def status_text(self) -> str:
        """For systemd STATUS=: empty while nothing drifts."""
        rep = self.report()
        if rep is None:
            return ""
        more = len(rep["quantities"]) - 1
        cmp = ">" if rep["direction"] == "above" else "<"
        return (f", DRIFT {rep['quantity']} {rep['value']:.4g} {cmp} {rep['bound']:.4g}"
                + (f" (+{more} more)" if more else ""))


def watch_for(manifest: DriftManifest | None, window: int, bundle_label: str) -> DriftWatch | None:
    """The watch a station runs; None, said once, when the bundle predates drift watch."""
    if manifest is None or not manifest.quantities:
        log.warning("drift_watch_off", bundle=bundle_label,
                    reason="the bundle has no drift reference (trained before drift watch, or too few good "
                           "images); retrain it with `station train` to watch for drift")
        return None
    return DriftWatch(manifest, window, bundle_label)
