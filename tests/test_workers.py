"""Several inspection workers: frames finish out of order, verdicts still leave in capture order."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import numpy as np

from station.core.frame import Frame
from station.core.verdict import Verdict
from station.service.daemon import Station
from station.tools.bench import MemorySource


class GatedPipeline:
    """Frame 0 cannot finish until frame 1 has: the second worker overtakes the first."""

    model: ClassVar[dict[str, str]] = {"name": "gated", "version": "1"}

    def __init__(self) -> None:
        self.second_done = threading.Event()
        self.finished: list[int] = []
        self._lock = threading.Lock()

    def process(self, frame: Frame) -> Verdict:
        if frame.seq == 0:
            assert self.second_done.wait(30), "frame 1 never ran beside frame 0"
        with self._lock:
            self.finished.append(frame.seq)
        if frame.seq == 1:
            self.second_done.set()
        return Verdict(frame=frame, verdict="pass", reasons=[], model=self.model)


def test_two_workers_publish_in_capture_order() -> None:
    pipeline = GatedPipeline()
    images = [np.zeros((4, 4, 3), np.uint8)] * 12
    published: list[dict[str, Any]] = []
    station = Station(pipeline, MemorySource(images), "cam1", "run",  # type: ignore[arg-type]
                      sinks=[lambda _v, m: published.append(m)], workers=2)
    counters = station.run(threading.Event())
    assert pipeline.finished[0] == 1 and pipeline.finished.index(0) > 0, "the workers finished out of order"
    assert [m["frame_id"] for m in published] == [f"mem/{i}" for i in range(12)]
    assert [m["seq"] for m in published] == list(range(12))
    assert counters.captured == counters.published == 12
