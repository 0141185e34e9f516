"""Several inspection workers: frames finish out of order, verdicts still leave in capture order.

And how many: the command line refuses the counts station.yaml refuses, in the same words.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import yaml

from station.core.frame import Frame
from station.core.verdict import Verdict
from station.service.daemon import Station, StationHooks, StationSettings
from station.tools.bench import MemorySource
from tests.conftest import run_station


class GatedPipeline:
    """Frame 0 cannot finish until frame 1 has: the second worker overtakes the first."""

    model: ClassVar[dict[str, str]] = {"name": "gated", "version": "1"}
    drift = None  # no drift watch, as a pipeline built without a drift window

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
    station = Station(pipeline, MemorySource(images), StationSettings("cam1", "run", workers=2),  # type: ignore[arg-type]
                      hooks=StationHooks(sinks=[lambda _v, m: published.append(m)]))
    counters = station.run(threading.Event())
    assert pipeline.finished[0] == 1 and pipeline.finished.index(0) > 0, "the workers finished out of order"
    assert [m["frame_id"] for m in published] == [f"mem/{i}" for i in range(12)]
    assert [m["seq"] for m in published] == list(range(12))
    assert counters.captured == counters.published == 12


@pytest.mark.parametrize(("workers", "threads"), [(-5, 0), (65, 0), (0, -1), (0, 257)])
def test_a_count_out_of_range_is_refused_not_taken_as_all_cores(workers: int, threads: int) -> None:
    from station.core import parallelism

    assert parallelism.plan(2, 1) == parallelism.Plan(2, 1)
    with pytest.raises(ValueError, match="Input should be"):
        parallelism.plan(workers, threads)


def _config_error(tmp_path: Path, key: str, value: int) -> str:
    """What `station run` says of ``inference: {KEY: value}``, after the key's name."""
    config = tmp_path / "station.yaml"
    config.write_text(yaml.safe_dump({"station_id": "a", "model": "m", "source": {"path": "."},
                                      "inference": {key: value}}))
    proc = run_station("run", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    return proc.stderr.split(f"inference.{key}: ", 1)[1].split(";")[0].strip()


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        (("replay", "--model", "m", "--source", "."), "--workers", -5),
        (("bench", "--model", "m"), "--workers", 65),
        (("soak", "--model", "m"), "--workers", -1),
        (("replay", "--model", "m", "--source", "."), "--threads", 257),
        (("bench", "--model", "m"), "--threads", -2),
    ],
)
def test_the_cli_refuses_worker_counts_as_station_yaml_does(tmp_path: Path, command: tuple[str, ...], option: str,
                                                            value: int) -> None:
    proc = run_station(*command, option, str(value), timeout=60)
    assert proc.returncode == 2, proc.stderr
    expected = _config_error(tmp_path, option.removeprefix("--"), value)
    assert f"argument {option}: {expected}" in proc.stderr
    assert "Traceback" not in proc.stderr
