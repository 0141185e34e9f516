"""The station: capture → inspect → publish threads joined by bounded queues.

Every captured frame is accounted for: it gets a verdict, or, when inspection
cannot keep up with a live source, an explicit ``skipped`` verdict (reason
``overload``). ``captured == published`` when the run ends.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from station.decide import FAIL, PASS, SKIPPED
from station.errors import StationError
from station.frame import Frame
from station.pipeline import REASON_INFERENCE, Pipeline
from station.publish import VerdictPublisher
from station.sources import Source
from station.verdict import Verdict, error_verdict, skipped_verdict

log = structlog.get_logger("station.daemon")

Sink = Callable[[Verdict, dict[str, Any]], None]

_END = object()


@dataclass
class Counters:
    captured: int = 0
    inspected: int = 0
    skipped: int = 0
    errors: int = 0
    published: int = 0
    passed: int = 0
    failed: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class Station:
    def __init__(
        self,
        pipeline: Pipeline,
        source: Source,
        station_id: str,
        run_id: str,
        publisher: VerdictPublisher | None = None,
        sinks: list[Sink] | None = None,
        queue_size: int = 8,
        skip_when_busy: bool | None = None,
        heartbeat_interval_s: float = 1.0,
    ) -> None:
        self.pipeline = pipeline
        self.source = source
        self.station_id = station_id
        self.run_id = run_id
        self.publisher = publisher
        self.sinks = sinks or []
        # Replay waits for inspection (every recorded frame gets a real verdict);
        # a live camera cannot wait, so its surplus frames are skipped, visibly.
        self.skip_when_busy = (not source.finite) if skip_when_busy is None else skip_when_busy
        self.heartbeat_interval_s = heartbeat_interval_s
        self.counters = Counters()
        self.state = "starting"
        self.source_error: StationError | None = None
        self._inspect_q: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._publish_q: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._local_seq = 0
        self._started = time.monotonic()

    # -- threads ---------------------------------------------------------

    def _capture(self, stop: threading.Event) -> None:
        try:
            for frame in self.source.frames(stop):
                with self._lock:
                    self.counters.captured += 1
                if not self.skip_when_busy:
                    self._inspect_q.put(frame)
                    continue
                try:
                    self._inspect_q.put_nowait(frame)
                except queue.Full:
                    self._publish_q.put(skipped_verdict(frame, self.pipeline.model))
        except StationError as exc:
            self.source_error = exc
            log.error("source_failed", source=self.source.describe(), error=str(exc))
            stop.set()
        except Exception as exc:
            self.source_error = StationError(f"source {self.source.describe()} crashed: {exc!r}")
            log.exception("source_crashed", source=self.source.describe())
            stop.set()
        finally:
            self._inspect_q.put(_END)

    def _inspect(self) -> None:
        while True:
            item = self._inspect_q.get()
            if item is _END:
                self._publish_q.put(_END)
                return
            frame: Frame = item
            try:
                verdict = self.pipeline.process(frame)
            except Exception as exc:  # fail-safe: never lose the frame
                log.exception("inspection_crashed", frame_id=frame.frame_id)
                verdict = error_verdict(frame, REASON_INFERENCE, repr(exc), self.pipeline.model)
            self._publish_q.put(verdict)

    # -- publishing (runs in the caller's thread) --------------------------

    def _emit(self, verdict: Verdict) -> None:
        verdict.latency_ms["total"] = (time.monotonic() - verdict.frame.captured_mono) * 1e3
        if self.publisher is not None:
            message = self.publisher.publish(verdict)
        else:
            message = verdict.to_message(self.station_id, self.run_id, self._local_seq, time.time())
            self._local_seq += 1
        with self._lock:
            c = self.counters
            c.published += 1
            if verdict.verdict == SKIPPED:
                c.skipped += 1
            elif verdict.error is not None:
                c.errors += 1
            else:
                c.inspected += 1
            if verdict.verdict == PASS:
                c.passed += 1
            elif verdict.verdict == FAIL:
                c.failed += 1
        for sink in self.sinks:
            sink(verdict, message)

    def fps(self) -> float:
        elapsed = time.monotonic() - self._started
        return self.counters.published / elapsed if elapsed > 0 else 0.0

    def _heartbeat(self) -> None:
        if self.publisher is not None:
            with self._lock:
                counters = self.counters.snapshot()
            self.publisher.heartbeat(self.state, counters, self.fps())

    def run(self, stop: threading.Event) -> Counters:
        """Run until the source ends (replay) or ``stop`` is set; drain; return the counters."""
        self._started = time.monotonic()
        capture = threading.Thread(target=self._capture, args=(stop,), name="capture", daemon=True)
        inspect = threading.Thread(target=self._inspect, name="inspect", daemon=True)
        self.state = "running"
        log.info("station_running", source=self.source.describe(), run_id=self.run_id)
        capture.start()
        inspect.start()
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                if stop.is_set() and self.state == "running":
                    self.state = "stopping"
                self._heartbeat()
                next_beat = now + self.heartbeat_interval_s
            try:
                item = self._publish_q.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                continue
            if item is _END:
                break
            self._emit(item)
        capture.join()
        inspect.join()
        self.state = "stopped"
        self._heartbeat()
        c = self.counters
        log.info("station_stopped", **c.snapshot(), fps=round(self.fps(), 2))
        if c.captured != c.published:  # would be a bug in this module; say so loudly
            log.error("accounting_mismatch", captured=c.captured, published=c.published)
        return c
