"""Simulated stations for plant-side load tests: valid verdicts through the real VerdictPublisher, no model.

``SimStation`` binds a publisher like a station does and publishes a
verdict message that validates against the verdict schema (a pass, or a
defect-class fail about one bottle in ten), at a fixed rate, with heartbeats
once a second. ``station plantsim`` runs many of them against a recorder
(and optionally an MQTT bridge) and reports what reached the database:
deploy/plantsim.sh and docs/integration.md ("Plant load test").
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from station.contract.counters import Counters
from station.core.anomaly import Region
from station.core.decide import FAIL, PASS, REASON_DEFECT_CLASS, Decision
from station.core.frame import Frame
from station.core.verdict import Verdict
from station.errors import StationError
from station.service.publish import VerdictPublisher

CLASSES = ("good", "cap_missing", "label_torn", "underfill")
MODEL = {"name": "plantsim", "version": "0"}


def simulated_verdict(seq: int, rng: random.Random) -> Verdict:
    now = time.time()
    frame = Frame(seq=seq, frame_id=f"sim-{seq:08d}", source="plantsim", captured_at=now,
                  captured_mono=time.monotonic())
    fail = rng.random() < 0.1
    label = rng.choice(CLASSES[1:]) if fail else "good"
    confidence = round(rng.uniform(0.8, 1.0), 6)
    scores = {c: (confidence if c == label else round((1 - confidence) / 3, 6)) for c in CLASSES}
    region = Region(bbox=(10, 20, 30, 40) if fail else None, area_px=1200 if fail else 0,
                    area_fraction=0.02 if fail else 0.0)
    decision = Decision(verdict=FAIL if fail else PASS, reasons=[REASON_DEFECT_CLASS] if fail else [], label=label,
                        confidence=confidence, scores=scores, anomaly_score=rng.uniform(0.0, 1.0), region=region)
    return Verdict(frame=frame, verdict=decision.verdict, reasons=list(decision.reasons), model=MODEL,
                   decision=decision, threshold=1.0)


class SimStation:
    """One simulated station: ``count`` verdicts at ``rate`` per second on ``endpoint``, in its own thread."""

    def __init__(self, endpoint: str, station: str, rate: float, count: int, seed: int = 0) -> None:
        self.publisher = VerdictPublisher(endpoint, station, uuid.uuid4().hex[:12])
        self.rate = rate
        self.count = count
        self.rng = random.Random(seed)
        self.counters = Counters()
        self.published: list[dict[str, object]] = []
        self.go = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sim-{station}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def publish_one(self) -> dict[str, object]:
        verdict = simulated_verdict(self.publisher.seq, self.rng)
        self.counters.captured += 1
        self.counters.inspected += 1
        self.counters.published += 1
        if verdict.verdict == PASS:
            self.counters.passed += 1
        else:
            self.counters.failed += 1
        message = self.publisher.publish(verdict, self.counters.snapshot())
        self.published.append(message)
        return message

    def _run(self) -> None:
        while not self.go.wait(0.05):
            self.publisher.service()
        start = time.monotonic()
        beat = start
        for n in range(self.count):
            # paced against the start, not the previous send, so the mean rate holds whatever the jitter
            delay = start + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.publish_one()
            if time.monotonic() - beat >= 1.0:
                beat = time.monotonic()
                self.publisher.heartbeat("running", self.counters.snapshot(), self.rate)
        self.publisher.heartbeat("stopped", self.counters.snapshot(), 0.0)
        self.done.set()

    def join(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return self.done.is_set()

    def close(self) -> None:
        self.publisher.close()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _bridge(kind: str, endpoints: list[str], *extra: str) -> subprocess.Popen[bytes]:
    connects = [a for e in endpoints for a in ("--connect", e)]
    return subprocess.Popen([sys.executable, "-m", "station.cli", "--log-level", "warning", "bridge", kind,
                             *connects, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class _MqttCount:
    """Counts verdict messages per station on the broker (json mode topics)."""

    def __init__(self, broker: str, prefix: str) -> None:
        from urllib.parse import urlparse

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        u = urlparse(broker)
        self.count = 0
        self._lock = threading.Lock()
        ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"plantsim-{uuid.uuid4().hex[:8]}")
        c.on_connect = lambda cl, *_: cl.subscribe(f"{prefix}/+/verdict", qos=1)
        c.on_subscribe = lambda *_: ready.set()
        c.on_message = self._on_message
        c.connect(u.hostname or "127.0.0.1", u.port or 1883)
        c.loop_start()
        if not ready.wait(10):
            raise StationError(f"plantsim: no subscription on {broker} within 10 s")
        self.client = c

    def _on_message(self, *_: Any) -> None:
        with self._lock:
            self.count += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def plantsim(stations: int, rate: float, count: int, db: str, broker: str | None, out: TextIO) -> dict[str, Any]:
    """``stations`` simulated stations × ``count`` verdicts at ``rate``/s into one recorder (and one MQTT bridge)."""
    import psycopg

    endpoints = [_free_endpoint() for _ in range(stations)]
    sims = [SimStation(ep, f"sim{n:02d}", rate, count, seed=n) for n, ep in enumerate(endpoints)]
    recorder = _bridge("mes", endpoints, "--db", db)
    procs = [recorder]
    mqtt_count = None
    if broker:
        prefix = f"plantsim{uuid.uuid4().hex[:6]}"
        mqtt_count = _MqttCount(broker, prefix)
        procs.append(_bridge("mqtt", endpoints, "--broker", broker, "--prefix", prefix))
    total = stations * count
    runs = [s.publisher.run_id for s in sims]
    sql_where = "run_id = ANY(%s)"
    try:
        for s in sims:
            if s.publisher.wait_for_subscribers(len(procs), 60) < len(procs):
                raise StationError(f"plantsim: bridges did not subscribe to {s.publisher.endpoint} within 60 s")
        for s in sims:
            s.start()
        cpu0, t0 = _cpu_s(recorder.pid), time.monotonic()
        for s in sims:
            s.go.set()
        print(f"plantsim: {stations} stations × {count} verdicts at {rate:g}/s", file=out)
        for s in sims:
            s.join(count / rate + 120)
        publish_s = time.monotonic() - t0
        written, cpu_s, wall_s = 0, None, 1.0
        deadline = time.monotonic() + 60
        with psycopg.connect(db) as conn:
            while time.monotonic() < deadline:
                for p in procs:
                    if p.poll() is not None:
                        raise StationError(f"plantsim: a bridge exited: {p.communicate()[1][-2000:].decode()}")
                row = conn.execute(f"SELECT count(*) FROM verdicts WHERE {sql_where}", (runs,)).fetchone()
                written = int(row[0]) if row else 0
                conn.commit()
                if written >= total and cpu_s is None:
                    cpu_s, wall_s = _cpu_s(recorder.pid) - cpu0, time.monotonic() - t0
                if written >= total and (mqtt_count is None or mqtt_count.count >= total):
                    break
                time.sleep(0.2)
            if cpu_s is None:
                cpu_s, wall_s = _cpu_s(recorder.pid) - cpu0, time.monotonic() - t0
            stats = conn.execute(
                f"SELECT (SELECT count(*) FROM gaps WHERE {sql_where}), "
                "percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM stored_at - published_at)), "
                "percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM stored_at - published_at)), "
                f"max(extract(epoch FROM stored_at - published_at)) FROM verdicts WHERE {sql_where}",
                (runs, runs)).fetchone()
            assert stats is not None  # an aggregate always returns one row
            gaps, p50, p99, pmax = stats
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if mqtt_count is not None:
            mqtt_count.close()
        for s in sims:
            s.close()
    report = {"stations": stations, "rate_per_station": rate, "published": total, "rows_written": written,
              "gaps": gaps, "lag_p50_ms": round(float(p50) * 1000, 1), "lag_p99_ms": round(float(p99) * 1000, 1),
              "lag_max_ms": round(float(pmax) * 1000, 1), "publish_s": round(publish_s, 2),
              "recorder_cpu_percent": round(100 * cpu_s / wall_s, 1),
              "mqtt_verdicts": mqtt_count.count if mqtt_count is not None else None}
    for k, v in report.items():
        print(f"  {k}: {v}", file=out)
    return report
