"""`station soak`: many frames through the daemon to an outside subscriber; nothing lost, memory flat.

The frames are synthetic bottles rendered once and cycled (a camera's frames,
without the disk). The subscriber is a separate `station subscribe --json`
process on 127.0.0.1, so every verdict crosses a real socket to a real reader;
each line it prints is parsed as a ``station.verdict/1`` message, and the
gaps are counted here from their ``seq``. The
station's resident memory is sampled as it runs: the baseline is taken once
the first tenth of the frames is through (allocator arenas and ONNX Runtime's
caches settled), growth is the last sample against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import ValidationError

from station.contract.messages import VerdictMessage
from station.core.pipeline import Pipeline
from station.core.verdict import Verdict
from station.errors import StationError
from station.service.daemon import Station, StationHooks, StationSettings
from station.service.publish import SequenceTracker, VerdictPublisher
from station.tools.bench import MemorySource, bench_style, free_endpoint, synth_images

MAX_GROWTH = 0.05


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class SoakReport:
    frames: int
    captured: int
    published: int
    received: int
    gaps: int
    missed: int
    seconds: float
    fps: float
    rss_baseline_mb: float
    rss_final_mb: float
    rss_max_mb: float
    rss_growth: float  # fraction of the baseline
    ok: bool

    def lines(self) -> list[str]:
        return [
            f"frames {self.frames}: captured {self.captured}, published {self.published}, "
            f"received by the subscriber {self.received} ({self.gaps} gaps, {self.missed} missed)",
            f"{self.seconds:.0f} s, {self.fps:.1f} frames/s",
            f"resident memory: {self.rss_baseline_mb:.1f} MB after the first tenth, {self.rss_final_mb:.1f} MB at "
            f"the end (growth {self.rss_growth * 100:+.2f} %, limit {MAX_GROWTH * 100:.0f} %), "
            f"max {self.rss_max_mb:.1f} MB",
            "soak: OK" if self.ok else "soak: FAILED",
        ]


class _MemoryProbe:
    def __init__(self, frames: int) -> None:
        self.baseline_at = max(1, frames // 10)
        self.baseline = 0
        self.maximum = 0
        self.last = 0

    def __call__(self, verdict: Verdict) -> None:
        seq = verdict.frame.seq
        if seq % 200 == 0 or seq == self.baseline_at:
            self.last = rss_bytes()
            self.maximum = max(self.maximum, self.last)
            if seq == self.baseline_at:
                self.baseline = self.last


def soak(pipeline: Pipeline, frames: int, workers: int, distinct: int = 60) -> SoakReport:
    images = synth_images(min(distinct, frames), style=bench_style(pipeline.bundle.manifest.view.lighting))
    endpoint = free_endpoint()
    publisher = VerdictPublisher(endpoint, "soak", uuid.uuid4().hex)
    subscriber = subprocess.Popen(
        [sys.executable, "-m", "station.cli", "subscribe", "--connect", endpoint, "--station-id", "soak",
         "--exit-on-stop", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    probe = _MemoryProbe(frames)
    try:
        if publisher.wait_for_subscribers(1, 30.0) < 1:
            raise StationError("the soak's subscriber did not connect within 30 s")
        station = Station(pipeline, MemorySource(images, count=frames),
                          StationSettings("soak", publisher.run_id, workers=workers), publisher,
                          StationHooks(on_verdict=probe))
        t0 = time.monotonic()
        counters = station.run(threading.Event())
        seconds = time.monotonic() - t0
        final = rss_bytes()
        try:
            out, err = subscriber.communicate(timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise StationError("the soak's subscriber did not finish within 120 s of the last verdict") from exc
    finally:
        subscriber.kill()
        publisher.close()
    if subscriber.returncode != 0:
        raise StationError(f"the soak's subscriber exited {subscriber.returncode}: {err[-500:]}")
    received, gaps, missed = count_received(out.splitlines())
    baseline = probe.baseline or final
    growth = (final - baseline) / baseline
    ok = counters.captured == counters.published == received == frames and gaps == 0 and growth < MAX_GROWTH
    mb = 1 / 2**20
    return SoakReport(frames, counters.captured, counters.published, received, gaps, missed, seconds,
                      frames / seconds, baseline * mb, final * mb, max(probe.maximum, final) * mb, growth, ok)


def count_received(lines: list[str]) -> tuple[int, int, int]:
    """(verdicts received, gaps, verdicts missed) from ``station subscribe --json``'s lines.

    A line that is not a valid verdict message is not counted as received, so it shows as a gap.
    """
    tracker = SequenceTracker()
    received = 0
    for line in lines:
        try:
            verdict = VerdictMessage.model_validate_json(line)
        except ValidationError:
            continue
        received += 1
        tracker.observe(verdict.run_id, verdict.seq)
    return received, tracker.gaps, tracker.missed


def write_json(report: SoakReport, path: Path) -> None:
    import json

    path.write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
