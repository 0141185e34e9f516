"""The live state the page shows, kept from the verdict stream: station, camera, counters, windows, banners.

Run counters are the station's own (each heartbeat and welcome carries them,
exact as of the last verdict published before it) plus the verdicts received
since, so they equal what was published even when this page joined late.
Breakdowns (failed by class and reason), the last hour, latencies and trends
are counted from the verdicts this page received; gaps in the stream are
banners, so a reader knows when those are short.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable
from typing import Any

from station.bridges.feed import FeedEvent
from station.contract.counters import Counters
from station.contract.liveness import Liveness
from station.core.folders import GOOD

Row = dict[str, Any]

HOUR_S = 3600.0
#: trends keep this many hours of per-hour counts
TREND_HOURS = 24
#: anomaly scores of recent bottles for the distribution chart
SCORE_HISTORY = 2000
HISTOGRAM_BINS = 30
#: a station silent for three heartbeat intervals (station/contract/liveness.py), at least this, is shown as lost
MIN_STALE_S = 3.0
#: a note (restart, reconnect) stays a banner this long
NOTE_BANNER_S = 120.0


def compact(m: dict[str, Any]) -> Row:
    """The fields of a verdict the page lists and the what-if needs."""
    cls = m.get("class") or {}
    anomaly = m.get("anomaly") or {}
    error = m.get("error") or {}
    latency = m.get("latency_ms") or {}
    return {
        "seq": m.get("seq"), "run_id": m.get("run_id"), "frame_id": m.get("frame_id"),
        "verdict": m.get("verdict"), "reasons": list(m.get("reasons") or []),
        "label": cls.get("label"), "confidence": cls.get("confidence"), **_good_and_defect(cls.get("scores")),
        "score": anomaly.get("score"), "threshold": anomaly.get("threshold"),
        "latency_ms": latency.get("total"), "captured_at": m.get("captured_at"),
        "published_at": m.get("published_at"), "truth": m.get("truth"), "error": error.get("reason"),
    }


def _good_and_defect(scores: Any) -> dict[str, float | None]:
    """P(good) and the defect classes' sum, for the what-if's defect_sum rule (station/core/decide.py)."""
    if not isinstance(scores, dict) or not isinstance(scores.get(GOOD), (int, float)):
        return {"good_probability": None, "defect_probability": None}
    return {"good_probability": float(scores[GOOD]),
            "defect_probability": float(sum(float(p) for c, p in scores.items() if c != GOOD))}


class Breakdown:
    """Fails by class and by reason, and the outcome counts, over the verdicts added (and removed)."""

    def __init__(self) -> None:
        self.outcomes: Tally[str] = Tally()
        self.by_class: Tally[str] = Tally()
        self.by_reason: Tally[str] = Tally()

    def add(self, row: Row, sign: int = 1) -> None:
        self.outcomes[row["verdict"]] += sign
        if row["error"] is not None:
            self.outcomes["errors"] += sign
        if row["verdict"] == "fail":
            self.by_class[row["label"] or "not inspected"] += sign
            for reason in row["reasons"]:
                self.by_reason[reason] += sign

    def as_dict(self) -> dict[str, Any]:
        passed, failed = self.outcomes["pass"], self.outcomes["fail"]
        return {
            "verdicts": sum(self.outcomes[k] for k in ("pass", "fail", "skipped")),
            "passed": passed, "failed": failed, "skipped": self.outcomes["skipped"], "errors": self.outcomes["errors"],
            "inspected": passed + failed - self.outcomes["errors"],
            "yield_pct": _yield(passed, failed),
            "failed_by_class": dict(sorted((k, v) for k, v in self.by_class.items() if v)),
            "failed_by_reason": dict(sorted((k, v) for k, v in self.by_reason.items() if v)),
        }


def _yield(passed: int, failed: int) -> float | None:
    return round(100.0 * passed / (passed + failed), 2) if passed + failed else None


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return round(sorted_values[k], 2)


class LiveState:
    """Fed by one thread (the stream), read by many (browsers); every read is a consistent snapshot."""

    def __init__(self, endpoint: str, recent_max: int = 20_000, clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint
        self._clock, self._mono = clock, mono
        self.cond = threading.Condition()
        #: bumped on every change; SSE writers wait for it to move
        self.version = 0
        self.started_at = clock()
        self.station: str | None = None
        self.run_id: str | None = None
        self.state: str | None = None
        self.camera: dict[str, Any] | None = None
        self.drift: Any = None
        self.fps: float | None = None
        self.model: dict[str, Any] | None = None
        self.counters = Counters()
        self.run_seen = Breakdown()
        self.run_missed = 0
        self.run_gaps = 0
        # Smoothed, so one late heartbeat does not move the staleness limit much.
        self.liveness = Liveness(floor_s=MIN_STALE_S, heartbeat_interval_s=1.0, smoothing=0.2)
        self.notes: deque[tuple[float, str]] = deque(maxlen=20)
        #: every verdict row received, newest last; ``total`` counts all ever added (an SSE cursor)
        self.recent: deque[Row] = deque(maxlen=recent_max)
        self.total = 0
        self._hour: deque[tuple[float, Row]] = deque()
        self.hour = Breakdown()
        self._hourly: dict[int, list[int]] = {}
        self._scores: deque[tuple[float, float | None]] = deque(maxlen=SCORE_HISTORY)
        self._cache: tuple[tuple[int, int], dict[str, Any]] | None = None

    # -- the stream (one thread) ----------------------------------------------

    def apply(self, event: FeedEvent, missed: int = 0) -> None:
        """One event from the feed; ``missed``: verdicts the sequence tracker found lost with it."""
        m = event.message
        now = self._clock()
        with self.cond:
            self.liveness.heard(self._mono(), event.kind == "heartbeat")
            run_id = m.get("run_id")
            if isinstance(run_id, str) and run_id != self.run_id:
                self._new_run(run_id)
            for note in event.notes:
                self.notes.append((now, note))
            if missed:
                self.run_missed += missed
                self.run_gaps += 1
            if isinstance(m.get("station"), str):
                self.station = m["station"]
            if event.kind == "verdict":
                self._verdict(m, now)
            else:
                self._status(event.kind, m)
            self._changed()

    def poke(self) -> None:
        """Something beside the stream changed (the archive, a review): wake the writers now."""
        with self.cond:
            self._changed()

    def _changed(self) -> None:
        self.version += 1
        self.cond.notify_all()

    def _new_run(self, run_id: str) -> None:
        self.run_id = run_id
        self.counters = Counters()
        self.run_seen = Breakdown()
        self.run_missed = self.run_gaps = 0
        self.drift = None

    def _status(self, kind: str, m: dict[str, Any]) -> None:
        counters = m.get("counters")
        if isinstance(counters, dict):
            self.counters = Counters(**{k: int(counters.get(k, 0)) for k in Counters().snapshot()})
        if isinstance(m.get("state"), str):
            self.state = m["state"]
        if kind == "heartbeat":
            self.camera = m.get("camera") if isinstance(m.get("camera"), dict) else None
            self.drift = m.get("drift")
            self.fps = m.get("fps") if isinstance(m.get("fps"), (int, float)) else None
        last = m.get("last_verdict")
        if kind == "welcome" and isinstance(last, dict):
            self.model = last.get("model")

    def _verdict(self, m: dict[str, Any], now: float) -> None:
        row = compact(m)
        row["received_at"] = now
        self.counters.count(str(row["verdict"]), row["error"] is not None)
        self.model = m.get("model") if isinstance(m.get("model"), dict) else self.model
        self.run_seen.add(row)
        self.recent.append(row)
        self.total += 1
        self._hour.append((now, row))
        self.hour.add(row)
        bucket = self._hourly.setdefault(int(now // HOUR_S), [0, 0, 0])
        bucket[{"pass": 0, "fail": 1}.get(row["verdict"], 2)] += 1
        if isinstance(row["score"], (int, float)):
            self._scores.append((float(row["score"]), row["threshold"]))
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._hour and self._hour[0][0] < now - HOUR_S:
            self.hour.add(self._hour.popleft()[1], -1)
        oldest = int(now // HOUR_S) - TREND_HOURS + 1
        for hour in [h for h in self._hourly if h < oldest]:
            del self._hourly[hour]

    # -- readers --------------------------------------------------------------

    def rows_since(self, cursor: int, limit: int = 200) -> tuple[list[Row], int]:
        """Rows added after ``cursor`` (at most ``limit``, the newest), and the new cursor."""
        with self.cond:
            n = min(self.total - cursor, len(self.recent), limit)
            rows = list(self.recent)[-n:] if n > 0 else []
            return rows, self.total

    def last_rows(self, n: int) -> list[Row]:
        with self.cond:
            return list(self.recent)[-n:] if n > 0 else []

    def contact(self) -> dict[str, Any]:
        mono = self._mono()
        age = self.liveness.silent_s(mono)
        return {"age_s": None if age is None else round(age, 1), "lost": not self.liveness.online(mono),
                "stale_after_s": round(self.liveness.window_s, 1)}

    def summary(self) -> dict[str, Any]:
        """The page's header, counters, banners and trends; recomputed at most twice a second per change."""
        with self.cond:
            key = (self.version, int(self._mono() * 2))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            now = self._clock()
            self._expire(now)
            contact = self.contact()
            c = self.counters
            run = {**c.snapshot(), "yield_pct": _yield(c.passed, c.failed), "seen": self.run_seen.as_dict(),
                   "missed": self.run_missed, "gaps": self.run_gaps}
            result = {
                "station": self.station, "run_id": self.run_id, "endpoint": self.endpoint,
                "state": self.state, "camera": self.camera, "drift": self.drift, "fps": self.fps,
                "model": self.model, "contact": contact, "run": run, "hour": self._hour_figures(now),
                "banners": self._banners(now, contact), "trends": self._trends(),
                "server_time": now, "total": self.total,
            }
            self._cache = (key, result)
            return result

    def _hour_figures(self, now: float) -> dict[str, Any]:
        figures = self.hour.as_dict()
        latencies = sorted(r["latency_ms"] for _, r in self._hour if isinstance(r["latency_ms"], (int, float)))
        last_minute = 0
        for t, _ in reversed(self._hour):
            if t < now - 60:
                break
            last_minute += 1
        window = min(HOUR_S, now - self.started_at)
        figures.update(latency_p50_ms=_percentile(latencies, 50), latency_p99_ms=_percentile(latencies, 99),
                       rate_per_min=last_minute if window >= 60 else None, window_s=round(window))
        return figures

    def _banners(self, now: float, contact: dict[str, Any]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        if self.liveness.last_message is None:
            out.append({"level": "error", "kind": "waiting",
                        "text": f"Waiting for the station at {self.endpoint}: nothing received yet."})
        elif contact["lost"] and self.state != "stopped":  # a stopped station is silent by design: its own banner
            out.append({"level": "error", "kind": "lost",
                        "text": f"No word from the station for {contact['age_s']:.0f} s (last state: {self.state}). "
                                "Figures are as of then; the page resumes when it is back."})
        if self.state == "stopped":
            out.append({"level": "warn", "kind": "stopped", "text": f"The station stopped (run {self.run_id})."})
        elif self.state == "degraded":
            error = (self.camera or {}).get("last_error")
            out.append({"level": "error", "kind": "degraded",
                        "text": "Degraded: the camera is lost and being reconnected"
                                + (f" ({error})" if error else "") + "."})
        if self.run_missed:
            out.append({"level": "warn", "kind": "gap",
                        "text": f"{self.run_missed} verdicts of this run were not received ({self.run_gaps} gaps). "
                                "Run counters stay exact; lists, breakdowns and charts miss them."})
        if self.drift not in (None, False, {}):
            out.append({"level": _drift_level(self.drift), "kind": "drift",
                        "text": "Drift: " + _render_drift(self.drift)})
        for at, note in self.notes:
            if now - at <= NOTE_BANNER_S:
                out.append({"level": "info", "kind": "note", "text": note})
        return out

    def _trends(self) -> dict[str, Any]:
        hours = [{"hour": h * int(HOUR_S), "passed": v[0], "failed": v[1], "skipped": v[2],
                  "yield_pct": _yield(v[0], v[1])} for h, v in sorted(self._hourly.items())]
        scores = [s for s, _ in self._scores]
        thresholds = [t for _, t in self._scores if isinstance(t, (int, float))]
        threshold = thresholds[-1] if thresholds else None
        histogram: dict[str, Any] = {"n": len(scores), "threshold": threshold, "bins": [], "lo": 0.0, "hi": 0.0,
                                     "above": sum(1 for s in scores if threshold is not None and s > threshold)}
        if scores:
            lo = min(0.0, *scores)
            hi = max(max(scores), (threshold or 0.0) * 1.25) or 1.0
            width = (hi - lo) / HISTOGRAM_BINS or 1.0
            bins = [0] * HISTOGRAM_BINS
            for s in scores:
                bins[min(HISTOGRAM_BINS - 1, int((s - lo) / width))] += 1
            histogram.update(bins=bins, lo=lo, hi=hi)
        return {"hours": hours, "scores": histogram}


def _render(value: Any) -> str:
    """Any JSON value as one readable line: ``a: 1, b: {c: 2}``; a future field shows without a code change."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_render(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _render_drift(value: Any) -> str:
    """The station's report lists every drifting quantity in ``quantities`` (the worst one also at the top)."""
    if isinstance(value, dict) and isinstance(value.get("quantities"), list) and value["quantities"]:
        return "; ".join(_render(q) for q in value["quantities"])
    return _render(value)


def _drift_level(value: Any) -> str:
    """A drift report that says all is well is information, anything else a warning."""
    if isinstance(value, dict):
        state = str(value.get("state", value.get("status", ""))).lower()
        flagged = any(value.get(k) is True for k in ("drifted", "drift", "alarm", "warning"))
        if not flagged and state in ("ok", "normal", "none", "in_range"):
            return "info"
    return "warn"
