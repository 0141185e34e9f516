"""Stop signals however they come: a double SIGTERM never hangs the station and never loses a verdict."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from station.core.frame import Frame
from station.core.verdict import Verdict
from station.service.daemon import Station, StationHooks, StationSettings
from station.tools.bench import MemorySource
from tests.stationproc import StationProcess

#: after the first SIGTERM, the station must be gone within this (systemd's TimeoutStopSec is 30 s)
DRAIN_BOUND_S = 20.0
ROUNDS = 20


def _signal(proc: subprocess.Popen[str], signum: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):  # already exited: a late signal has nothing to hit
        proc.send_signal(signum)


@pytest.mark.slow
def test_double_sigterm_at_random_moments_exits_0_with_every_frame_published(bundle: Path, eval_root: Path,
                                                                            tmp_path: Path) -> None:
    images = sorted(p for cls in sorted(eval_root.iterdir()) for p in sorted(cls.iterdir()))
    rng = random.Random(14)
    outcomes: list[str] = []
    for round_no in range(ROUNDS):
        folder = tmp_path / f"round{round_no}"
        incoming = folder / "incoming"
        incoming.mkdir(parents=True)
        for i in range(60):
            shutil.copy(images[i % len(images)], incoming / f"{i:03d}.png")
        station = StationProcess(folder, {"model": str(bundle),
                                          "source": {"path": str(incoming), "poll_interval_s": 0.05},
                                          "inference": {"queue_size": 8},
                                          # held until our subscriber is connected, so it sees every verdict
                                          "publish": {"wait_subscribers": 1}})
        try:
            # Frames in flight: the folder holds more than the queue, and the first signal comes
            # after a random number of verdicts, the second after a random gap (0 to 50 ms).
            station.wait_verdicts(rng.randint(1, 20), timeout_s=120)
            gap = rng.uniform(0, 0.05)
            started = time.monotonic()
            _signal(station.proc)
            time.sleep(gap)
            _signal(station.proc)
            if round_no % 4 == 3:  # a burst, as a supervisor signalling a process group may send
                for _ in range(5):
                    _signal(station.proc)
            try:
                _, err = station.proc.communicate(timeout=DRAIN_BOUND_S)
            except subprocess.TimeoutExpired:
                station.proc.kill()
                _, err = station.proc.communicate()
                raise AssertionError(f"round {round_no}: still running {DRAIN_BOUND_S} s after SIGTERM "
                                     f"(gap {gap * 1e3:.0f} ms): {err[-2000:]}") from None
            took = time.monotonic() - started
            rc = station.proc.returncode
            assert rc == 0, f"round {round_no}: exit {rc} (gap {gap * 1e3:.0f} ms): {err[-2000:]}"
            c = station.stopped_heartbeat(timeout_s=10)["counters"]
            assert c["captured"] == c["published"], f"round {round_no}: {c}"
            verdicts = station.wait_verdicts(c["published"], timeout_s=10)
            assert [v["seq"] for v in verdicts] == list(range(c["published"])), f"round {round_no}"
            assert "station_stopped" in err
            skipped = [v for v in verdicts if v["verdict"] == "skipped"]
            assert all(v["reasons"] == ["shutdown"] for v in skipped), f"round {round_no}: {skipped[:2]}"
            outcomes.append(f"{c['published']} published, {len(skipped)} shutdown-skipped, {took:.2f} s")
        finally:
            station.close()
    print("\n".join(outcomes))


class SlowPipeline:
    """Frame 0 holds its worker until released, so later frames are still queued when finish_now comes."""

    model: ClassVar[dict[str, str]] = {"name": "slow", "version": "1"}
    drift = None  # no drift watch, as a pipeline built without a drift window

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def process(self, frame: Frame) -> Verdict:
        if frame.seq == 0:
            self.started.set()
            assert self.release.wait(30)
        return Verdict(frame=frame, verdict="pass", reasons=[], model=self.model)


def test_finish_now_publishes_the_frame_in_inspection_and_skips_the_queued_ones() -> None:
    pipeline = SlowPipeline()
    images = [np.zeros((4, 4, 3), np.uint8)] * 6
    published: list[dict[str, Any]] = []
    station = Station(pipeline, MemorySource(images),  # type: ignore[arg-type]
                      StationSettings("cam1", "run", workers=1, queue_size=8),
                      hooks=StationHooks(sinks=[lambda _v, m: published.append(m)]))
    stop, finish_now = threading.Event(), threading.Event()
    runner = threading.Thread(target=lambda: station.run(stop, finish_now))
    runner.start()
    assert pipeline.started.wait(30)
    stop.set()
    finish_now.set()
    pipeline.release.set()
    runner.join(30)
    assert not runner.is_alive()
    assert [(m["seq"], m["verdict"], m["reasons"]) for m in published] == (
        [(0, "pass", [])] + [(i, "skipped", ["shutdown"]) for i in range(1, 6)])
    c = station.counters
    assert c.captured == c.published == 6 and c.inspected == 1 and c.skipped == 5


RAPID_FIRE = """
import os, signal, subprocess, sys
from station.service.signals import ShutdownSignals

SENDER = '''
import os, signal, sys
pid = int(sys.argv[1])
for n in range(100000):
    os.kill(pid, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)[n % 3])
'''
hups = []
with ShutdownSignals(on_hup=lambda: hups.append(1)) as signals:
    # From another process, as a supervisor or a shell sends them: each can land while the
    # main thread is still inside the handling of the one before.
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(os.getpid())])
    while sender.poll() is None:
        pass  # running bytecode, where Python runs signal handlers
    assert signals.stop.wait(10), "no stop"
    assert signals.finish_now.wait(10), "no finish_now"
    # One write: the dispatcher thread logs to the same stdout, and print() writes each argument apart.
    print(f"handled {signals.received} {len(hups)}", flush=True)
# Signals arriving while the interpreter shuts down must not turn exit 0 into 143.
os.kill(os.getpid(), signal.SIGTERM)
sys.exit(0)
"""


def test_thousands_of_signals_in_a_burst_neither_hang_nor_kill_the_process() -> None:
    """The handler only writes to a pipe, so a signal landing inside another one's handling is harmless."""
    proc = subprocess.run([sys.executable, "-c", RAPID_FIRE], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "handled " in proc.stdout


ORPHANED = """
import os, sys, time
from station.service.logsetup import configure_logging
from station.service.signals import ShutdownSignals
configure_logging("info")
r, w = os.pipe()
os.close(r)
os.dup2(w, 2)  # stderr now a pipe nobody reads: every log line fails (EPIPE), as under a dead parent
with ShutdownSignals() as signals:
    os.kill(os.getpid(), 15)
    if not signals.stop.wait(10):
        sys.stdout.write("stop lost")
        sys.exit(3)
sys.stdout.write("stopped")
"""


def test_a_stop_signal_is_not_lost_when_the_log_cannot_be_written() -> None:
    """Under an orphaned process stderr may be gone: the stop must still happen (or only SIGKILL ends it)."""
    proc = subprocess.run([sys.executable, "-c", ORPHANED], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout == "stopped", (proc.returncode, proc.stdout)
