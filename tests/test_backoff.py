"""Backoff: the reconnect delays of a camera source (doubling, capped, reset once connected)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from station.errors import SourceError
from station.sources.camera import Backoff, CameraLost, CameraSource, Grab, SourceEnded


def test_delays_double_from_the_initial_up_to_the_cap_and_stay_there() -> None:
    b = Backoff(initial_s=0.1, max_s=1.0, factor=2.0)
    assert [b.next_delay() for _ in range(7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_reset_starts_the_sequence_over() -> None:
    b = Backoff(initial_s=0.25, max_s=2.0, factor=3.0)
    assert [b.next_delay() for _ in range(3)] == pytest.approx([0.25, 0.75, 2.0])
    b.reset()
    assert [b.next_delay() for _ in range(2)] == pytest.approx([0.25, 0.75])


def test_a_factor_of_one_is_a_fixed_delay() -> None:
    b = Backoff(initial_s=0.5, max_s=5.0, factor=1.0)
    assert [b.next_delay() for _ in range(4)] == pytest.approx([0.5] * 4)


class _RecordingStop(threading.Event):
    """A stop event whose waits return at once and are recorded: the delays the source asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(float(timeout or 0.0))
        return self.is_set()


class _FlakyCamera:
    """Refuses ``fail_first`` opens, delivers one frame, is lost, refuses ``fail_after`` more, then ends."""

    name = "fake:cam"
    finite = False

    def __init__(self, fail_first: int, fail_after: int) -> None:
        self.plan = ["refuse"] * fail_first + ["frame-then-lost"] + ["refuse"] * fail_after + ["end"]
        self.step = ""
        self.grabs = 0

    def open(self) -> None:
        self.step = self.plan.pop(0)
        if self.step == "refuse":
            raise SourceError("no camera on the bus")

    def grab(self) -> Grab | None:
        if self.step == "end":
            raise SourceEnded("done")
        self.grabs += 1
        if self.grabs % 2 == 1:
            return Grab(frame_id=f"f{self.grabs}", image=np.zeros((4, 4, 3), np.uint8))
        raise CameraLost("unplugged")

    def close(self) -> None:
        pass


def test_a_camera_source_backs_off_while_the_camera_is_away_and_starts_over_after_it_came_back() -> None:
    stop = _RecordingStop()
    source = CameraSource(_FlakyCamera(fail_first=6, fail_after=3), Backoff(initial_s=0.1, max_s=1.0))
    frames = list(source.frames(stop))
    assert [f.frame_id for f in frames] == ["f1"]
    # Six refusals: doubling to the cap. Connected once: the next outage starts from the initial delay.
    assert stop.waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 0.1, 0.2, 0.4])
    assert source.health.connects == 2 and source.health.disconnects >= 1
