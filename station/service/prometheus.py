"""Prometheus metrics for `station run`, served over HTTP (``metrics.listen``).

Two kinds: what each verdict adds (verdicts by result and class, reasons,
latency per stage) is recorded as the verdict is published; what the station
already counts (frames, queue depths, camera state, archive) is read from it
at scrape time, so the two can never disagree with the heartbeat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from station.core.verdict import Verdict
from station.errors import ConfigError

STATES = ("starting", "running", "degraded", "stopping", "stopped")
CAMERA_STATES = ("connecting", "connected", "disconnected")
#: seconds; a bottle line runs 1-30 bottles/s, so the interesting range is 1 ms … 2.5 s
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _StationCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        frames = CounterMetricFamily("station_frames", "Frames by what became of them", labels=["outcome"])
        for outcome, value in s["counters"].items():
            frames.add_metric([outcome], value)
        yield frames
        state = GaugeMetricFamily("station_state", "1 for the station's current state", labels=["state"])
        for name in STATES:
            state.add_metric([name], 1.0 if s["state"] == name else 0.0)
        yield state
        queues = GaugeMetricFamily("station_queue_depth", "Items waiting in each pipeline queue", labels=["queue"])
        for name, depth in s["queues"].items():
            queues.add_metric([name], depth)
        yield queues
        yield GaugeMetricFamily("station_fps", "Verdicts per second since start", value=s["fps"])
        info = GaugeMetricFamily("station_model_info", "The bundle in use", labels=["name", "version"])
        info.add_metric([s["model"]["name"], s["model"]["version"]], 1.0)
        yield info
        camera = s.get("camera")
        if camera is not None:
            cstate = GaugeMetricFamily("station_camera_state", "1 for the camera's current state", labels=["state"])
            for name in CAMERA_STATES:
                cstate.add_metric([name], 1.0 if camera["state"] == name else 0.0)
            yield cstate
            for key, help_text in (("connects", "Camera connections made"),
                                   ("disconnects", "Camera losses"),
                                   ("camera_skipped", "Frames the acquisition dropped to stay current"),
                                   ("grab_failed", "Frames the camera announced but could not deliver")):
                yield CounterMetricFamily(f"station_camera_{key.removeprefix('camera_')}", help_text,
                                          value=camera[key])
        yield from _drift_metrics(s.get("drift"))
        archive = s.get("archive")
        if archive is not None:
            for key, value in archive.items():
                kind = GaugeMetricFamily if key in ("files", "bytes", "queue") else CounterMetricFamily
                yield kind(f"station_archive_{key}", f"Reject archive: {key}", value=value)


def _drift_metrics(drift: dict[str, Any] | None) -> Iterator[Metric]:
    """Drift watch: one series per watched quantity, so an alert can name the quantity that moved."""
    yield GaugeMetricFamily("station_drift_watch", "1 while drift watch runs (0: off, or a bundle without a "
                                                   "drift reference)", value=0.0 if drift is None else 1.0)
    if drift is None:
        return
    flag = GaugeMetricFamily("station_drift", "1 while the quantity's window median is past its bound",
                             labels=["quantity"])
    value = GaugeMetricFamily("station_drift_value", "Window median of the quantity (once judged)",
                              labels=["quantity"])
    bound = GaugeMetricFamily("station_drift_bound", "The bound the window median is held to",
                              labels=["quantity", "side"])
    samples = GaugeMetricFamily("station_drift_samples", "Values in the quantity's window", labels=["quantity"])
    for name, q in drift["quantities"].items():
        flag.add_metric([name], 1.0 if q["drifting"] else 0.0)
        if q["value"] is not None:
            value.add_metric([name], q["value"])
        for side in ("low", "high"):
            if q[side] is not None:
                bound.add_metric([name, side], q[side])
        samples.add_metric([name], q["samples"])
    yield from (flag, value, bound, samples)
    yield GaugeMetricFamily("station_drift_window", "Drift watch window length (bottles)", value=drift["window"])


class StationMetrics:
    def __init__(self, read_station: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.verdicts = Counter("station_verdicts", "Published verdicts", ["result", "class"], registry=self.registry)
        self.reasons = Counter("station_verdict_reasons", "Reasons given in verdicts", ["reason"],
                               registry=self.registry)
        self.latency = Histogram("station_stage_latency_seconds", "Time spent per pipeline stage", ["stage"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StationCollector(read_station))
        self._server: Any = None

    def observe(self, verdict: Verdict) -> None:
        self.verdicts.labels(verdict.verdict, verdict.label or "none").inc()
        for reason in verdict.reasons:
            self.reasons.labels(reason).inc()
        for stage, ms in verdict.latency_ms.items():
            self.latency.labels(stage).observe(ms / 1e3)

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        try:
            self._server, _thread = start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics.listen: cannot serve metrics on {listen}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
