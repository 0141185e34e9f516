"""The station: capture → inspect → publish threads joined by bounded queues.

Every captured frame is accounted for: it gets a verdict, or, when inspection
cannot keep up with a live source, an explicit ``skipped`` verdict (reason
``overload``). ``captured == published`` when the run ends.

Stopping: ``stop`` ends capture and drains, every captured frame inspected and
published. ``finish_now`` (a second SIGTERM during the drain) cuts the drain
short: frames not yet inspected are published as ``skipped`` (reason
``shutdown``), the ones being inspected finish and are published.

Inspection runs in ``workers`` threads (decode, preprocessing and both models
release the GIL, so on N cores N workers inspect N frames at once); verdicts
are published in capture order whatever order the workers finish in, so a
reject gate that counts bottles is never handed them out of order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from station.contract.counters import Counters
from station.core.decide import REASON_SHUTDOWN
from station.core.drift import DriftWatch
from station.core.pipeline import REASON_INFERENCE, Pipeline
from station.core.verdict import Verdict, error_verdict, skipped_verdict
from station.errors import StationError
from station.service.publish import VerdictPublisher
from station.service.sdnotify import Notifier
from station.sources import Source

log = structlog.get_logger("station.daemon")

Sink = Callable[[Verdict, dict[str, Any]], None]

_END = object()


@dataclass(frozen=True)
class StationSettings:
    """Who the station is and how it runs: fixed for a run (a reload swaps the pipeline, never these)."""

    station_id: str
    run_id: str
    #: inspection threads (see the module's docstring)
    workers: int = 1
    #: frames captured but not yet taken by a worker; a live source skips beyond it
    queue_size: int = 8
    heartbeat_interval_s: float = 1.0
    #: systemd's watchdog period to keep (None: no watchdog)
    watchdog_interval_s: float | None = None


@dataclass
class StationHooks:
    """What the station calls out to besides the publisher; each is optional."""

    #: called with every verdict and its message, in capture order (files, the UI's feed)
    sinks: list[Sink] = field(default_factory=list)
    #: called with every verdict before the sinks (metrics, soak probes)
    on_verdict: Callable[[Verdict], None] | None = None
    #: systemd notifications; None: a notifier that sends nothing
    notifier: Notifier | None = None
    #: builds a new pipeline (config and bundle re-read) when ``reload_requested`` is set
    reloader: Callable[[], Pipeline] | None = None
    #: set (by SIGHUP) to reload config and bundle between frames
    reload_requested: threading.Event | None = None


class Station:
    """The running inspection station: a source's frames in, one published verdict per frame out.

    Contract: ``run(stop)`` blocks until the source ends or ``stop`` is set, then drains (see the
    module's docstring) and returns the counters, with ``captured == published``; every frame gets
    exactly one verdict, published in capture order with consecutive ``seq``, and heartbeats go out
    every ``heartbeat_interval_s`` meanwhile. A source that fails ends the run with
    ``source_error`` set. ``snapshot`` and the other read-only views may be called from any thread.
    """

    def __init__(self, pipeline: Pipeline, source: Source, settings: StationSettings,
                 publisher: VerdictPublisher | None = None, hooks: StationHooks | None = None) -> None:
        hooks = hooks or StationHooks()
        self.pipeline = pipeline
        self.source = source
        self.settings = settings
        self.station_id = settings.station_id
        self.run_id = settings.run_id
        self.publisher = publisher
        self.sinks = list(hooks.sinks)
        # Files wait for inspection (every one gets a real verdict); a live camera
        # cannot wait, so its surplus frames are skipped, visibly.
        self.skip_when_busy = source.on_overload == "skip"
        self.heartbeat_interval_s = settings.heartbeat_interval_s
        self.counters = Counters()
        self.state = "starting"
        self.source_error: StationError | None = None
        self.workers = max(1, settings.workers)
        self._inspect_q: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_size)
        self._publish_q: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._local_seq = 0
        self._started = time.monotonic()
        self.notifier = hooks.notifier or Notifier(address="")
        self.watchdog_interval_s = settings.watchdog_interval_s
        self.reloader = hooks.reloader
        self.on_verdict = hooks.on_verdict
        self.reload_requested = hooks.reload_requested or threading.Event()
        self.finish_now = threading.Event()
        self._reload_thread: threading.Thread | None = None
        self._last_progress = time.monotonic()
        self._published_at_last_ping = 0

    # -- threads ---------------------------------------------------------

    def _capture(self, stop: threading.Event) -> None:
        index = 0  # capture order: the order verdicts are published in
        try:
            for frame in self.source.frames(stop):
                with self._lock:
                    self.counters.captured += 1
                if frame.skip_reason is not None:  # dropped by the camera layer: accounted for, not inspected
                    self._publish_q.put((index, skipped_verdict(frame, self.pipeline.model, frame.skip_reason)))
                elif not self.skip_when_busy:
                    self._inspect_q.put((index, frame))
                else:
                    try:
                        self._inspect_q.put_nowait((index, frame))
                    except queue.Full:
                        self._publish_q.put((index, skipped_verdict(frame, self.pipeline.model)))
                index += 1
        except StationError as exc:
            self.source_error = exc
            log.error("source_failed", source=self.source.describe(), error=str(exc))
            stop.set()
        except Exception as exc:
            self.source_error = StationError(f"source {self.source.describe()} crashed: {exc!r}")
            log.exception("source_crashed", source=self.source.describe())
            stop.set()
        finally:
            for _ in range(self.workers):
                self._inspect_q.put(_END)

    def _inspect(self) -> None:
        while True:
            item = self._inspect_q.get()
            if item is _END:
                self._publish_q.put(_END)
                return
            index, frame = item
            pipeline = self.pipeline  # a reload swaps it between frames, never during one
            if self.finish_now.is_set():
                self._publish_q.put((index, skipped_verdict(frame, pipeline.model, REASON_SHUTDOWN)))
                continue
            try:
                verdict = pipeline.process(frame)
            except Exception as exc:  # fail-safe: never lose the frame
                log.exception("inspection_crashed", frame_id=frame.frame_id)
                verdict = error_verdict(frame, REASON_INFERENCE, repr(exc), pipeline.model)
            self._publish_q.put((index, verdict))

    # -- publishing (runs in the caller's thread) --------------------------

    def _emit(self, verdict: Verdict) -> None:
        verdict.latency_ms["total"] = (time.monotonic() - verdict.frame.captured_mono) * 1e3
        with self._lock:
            self.counters.count(verdict.verdict, verdict.error is not None)
            counters = self.counters.snapshot()
        if self.publisher is not None:
            # The counters go into the welcome a late joiner gets, current with this verdict.
            message = self.publisher.publish(verdict, counters)
        else:
            message = verdict.to_message(self.station_id, self.run_id, self._local_seq, time.time())
            self._local_seq += 1
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        for sink in self.sinks:
            sink(verdict, message)

    # -- systemd: watchdog from progress, reload without losing a frame -----

    def _feed_watchdog(self) -> None:
        """WATCHDOG=1 only while the pipeline moves: verdicts came out, or nothing is waiting.

        A timer thread would keep a stuck pipeline alive; this is called from
        the publishing loop, so if that loop or inspection hangs with frames
        pending, systemd stops hearing from us and restarts the service.
        """
        with self._lock:
            published = self.counters.published
            pending = self.counters.captured - published
        if published != self._published_at_last_ping or pending == 0:
            self._published_at_last_ping = published
            self.notifier.watchdog()

    @property
    def effective_state(self) -> str:
        """``degraded`` while running without a camera (it is being reconnected)."""
        return "degraded" if self.state == "running" and self.source.degraded else self.state

    def camera_health(self) -> dict[str, Any] | None:
        return self.source.health_snapshot()

    def snapshot(self) -> dict[str, Any]:
        """Everything heartbeats, STATUS and metrics report, read at one moment."""
        with self._lock:
            counters = self.counters.snapshot()
        return {
            "state": self.effective_state,
            "counters": counters,
            "fps": self.fps(),
            "queues": {"inspect": self._inspect_q.qsize(), "publish": self._publish_q.qsize()},
            "model": dict(self.pipeline.model),
            "camera": self.camera_health(),
            "drift": self.drift_snapshot(),
        }

    def _drift_watch(self) -> DriftWatch | None:
        # The pipeline's: a reload brings the new bundle's reference with it.
        return self.pipeline.drift

    def drift_report(self) -> dict[str, Any] | None:
        """The heartbeat's ``drift``: None while nothing drifts (or the watch is off)."""
        watch = self._drift_watch()
        return watch.report() if watch is not None else None

    def drift_snapshot(self) -> dict[str, Any] | None:
        """Every watched quantity, for the metrics; None when the watch is off."""
        watch = self._drift_watch()
        return watch.snapshot() if watch is not None else None

    def _status_line(self) -> str:
        c = self.counters
        camera = self.camera_health()
        cam = f", camera {camera['state']}" if camera else ""
        watch = self._drift_watch()
        drift = watch.status_text() if watch is not None else ""
        return (f"{self.effective_state}{cam}: inspected {c.inspected}, failed {c.failed}, skipped {c.skipped}, "
                f"errors {c.errors}, {self.fps():.1f} fps, model {self.pipeline.model['name']} "
                f"{self.pipeline.model['version']}{drift}")

    def _start_reload(self) -> None:
        if self.reloader is None or (self._reload_thread and self._reload_thread.is_alive()):
            return
        self.reload_requested.clear()
        self.notifier.reloading()
        reloader = self.reloader

        def load() -> None:
            try:
                new = reloader()
            except Exception as exc:  # a bad new bundle or config must not stop the line
                log.error("reload_refused", reason=str(exc), keeping=self.pipeline.model)
            else:
                self.pipeline = new
                log.info("reloaded", model=new.model)
            self.notifier.ready(self._status_line())

        self._reload_thread = threading.Thread(target=load, name="reload", daemon=True)
        self._reload_thread.start()

    def fps(self) -> float:
        elapsed = time.monotonic() - self._started
        return self.counters.published / elapsed if elapsed > 0 else 0.0

    def _heartbeat(self) -> None:
        if self.publisher is not None:
            s = self.snapshot()
            # Drift is a warning beside the state, never a state of its own: the verdicts stay valid.
            extra: dict[str, Any] = {"drift": self.drift_report()}
            if s["camera"] is not None:
                extra["camera"] = s["camera"]
            self.publisher.heartbeat(s["state"], s["counters"], s["fps"], extra)

    def run(self, stop: threading.Event, finish_now: threading.Event | None = None) -> Counters:
        """Run until the source ends (replay) or ``stop`` is set; drain; return the counters.

        ``finish_now``: when set (a second SIGTERM), frames not yet inspected are skipped.
        """
        if finish_now is not None:
            self.finish_now = finish_now
        self._started = time.monotonic()
        capture = threading.Thread(target=self._capture, args=(stop,), name="capture", daemon=True)
        inspectors = [threading.Thread(target=self._inspect, name=f"inspect-{n}", daemon=True)
                      for n in range(self.workers)]
        self.state = "running"
        log.info("station_running", source=self.source.describe(), run_id=self.run_id, workers=self.workers)
        capture.start()
        for thread in inspectors:
            thread.start()
        self.notifier.ready(self._status_line())
        tick = min(self.heartbeat_interval_s, self.watchdog_interval_s or self.heartbeat_interval_s)
        next_beat = next_tick = time.monotonic()
        ended = 0  # workers that have finished
        waiting: dict[int, Verdict] = {}  # verdicts that finished before an earlier frame's
        next_index = 0
        while ended < self.workers:
            now = time.monotonic()
            if self.reload_requested.is_set():
                self._start_reload()
            if stop.is_set() and self.state == "running":
                self.state = "stopping"
                self.notifier.stopping()
            if now >= next_tick:
                self._feed_watchdog()
                self.notifier.status(self._status_line())
                next_tick = now + tick
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + self.heartbeat_interval_s
            try:
                wait = min(next_beat, next_tick) - time.monotonic()
                item = self._publish_q.get(timeout=max(0.0, min(wait, 0.1)))
            except queue.Empty:
                if self.publisher is not None:
                    self.publisher.service()
                continue
            if item is _END:
                ended += 1
                continue
            index, verdict = item
            waiting[index] = verdict
            while next_index in waiting:
                self._emit(waiting.pop(next_index))
                next_index += 1
        if waiting:  # a gap in capture order would be a bug here; publish rather than lose them
            log.error("publish_order_gap", expected=next_index, waiting=sorted(waiting))
            for index in sorted(waiting):
                self._emit(waiting.pop(index))
        if stop.is_set() and self.state == "running":  # stopped between two checks of the loop
            self.state = "stopping"
            self.notifier.stopping()
        capture.join()
        for thread in inspectors:
            thread.join()
        if self._reload_thread is not None:
            self._reload_thread.join()
        self.state = "stopped"
        self._heartbeat()
        c = self.counters
        log.info("station_stopped", **c.snapshot(), fps=round(self.fps(), 2))
        if c.captured != c.published:  # would be a bug in this module; say so loudly
            log.error("accounting_mismatch", captured=c.captured, published=c.published)
        return c
