"""Live cameras: one reconnecting source over any camera driver (pylon, OpenCV).

A driver only knows how to open, grab and close. This module owns what every
camera on a line needs around that: reconnect with capped exponential backoff
when the camera vanishes, a state the daemon reports (``connected`` or
``disconnected``, which makes the heartbeat say ``degraded``), and a Frame for
every frame the camera produced, including the ones the acquisition layer had
to drop to stay current, which become ``skipped`` verdicts (reason
``camera_skipped``) instead of silent gaps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import structlog

from station.core.frame import Frame, Trigger
from station.errors import FrameError, SourceError
from station.sources import OnOverload, SourceBase

log = structlog.get_logger("station.camera")

CONNECTED = "connected"
DISCONNECTED = "disconnected"
CONNECTING = "connecting"

#: Frame.skip_reason of frames the acquisition layer dropped (no image; a ``skipped`` verdict)
REASON_CAMERA_SKIPPED = "camera_skipped"
#: the FrameError reason of a frame the camera announced but could not deliver
REASON_GRAB_FAILED = "grab_failed"


class CameraLost(SourceError):
    """The camera stopped answering (unplugged, power cut, stream ended); reconnect."""


class SourceEnded(SourceError):
    """A finite input (a video file) has no more frames: the end of the run, not a fault."""


@dataclass
class Grab:
    """What a driver hands back for one frame."""

    frame_id: str
    image: np.ndarray | None = None  # BGR uint8
    error: FrameError | None = None  # a frame the camera announced but could not deliver
    #: ids of frames the driver dropped just before this one (a newest-only grab strategy)
    skipped_ids: list[str] = field(default_factory=list)
    trigger: Trigger | None = None


class CameraDriver(Protocol):
    #: "pylon:<serial>", "opencv:<url>": the verdict's ``source``
    name: str
    #: True for a video file: frames are never dropped and the run ends with the file
    finite: bool

    def open(self) -> None:
        """Connect and configure; raises SourceError (retried) or ConfigError (fatal)."""

    def grab(self) -> Grab | None:
        """The next frame, or None after the driver's own timeout; raises CameraLost."""

    def close(self) -> None: ...


@dataclass
class Backoff:
    """Capped exponential backoff; the cap bounds how late a returning camera is noticed."""

    initial_s: float = 0.1
    max_s: float = 1.0
    factor: float = 2.0
    _next: float = 0.0

    def reset(self) -> None:
        self._next = self.initial_s

    def next_delay(self) -> float:
        delay = self._next or self.initial_s
        self._next = min(delay * self.factor, self.max_s)
        return delay


@dataclass
class CameraHealth:
    state: str = CONNECTING
    connects: int = 0
    disconnects: int = 0
    camera_skipped: int = 0
    grab_failed: int = 0
    last_error: str | None = None
    since: float = field(default_factory=time.monotonic)

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self.state,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "camera_skipped": self.camera_skipped,
            "grab_failed": self.grab_failed,
            "last_error": self.last_error,
            "state_for_s": round(time.monotonic() - self.since, 3),
        }


class CameraSource(SourceBase):
    """A live source over a driver: runs until stopped, reconnecting as long as it takes."""

    def __init__(self, driver: CameraDriver, backoff: Backoff | None = None) -> None:
        self.driver = driver
        self.finite = driver.finite
        # A video file's frames can wait for inspection; a live camera's cannot.
        self.on_overload: OnOverload = "wait" if driver.finite else "skip"
        self.backoff = backoff or Backoff()
        self.health = CameraHealth()
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"camera {self.driver.name}"

    @property
    def degraded(self) -> bool:
        """Lost or never reached the camera (not while the first connection is being made)."""
        return self.health.state == DISCONNECTED

    def health_snapshot(self) -> dict[str, object]:
        with self._lock:
            return self.health.snapshot()

    def _set_state(self, state: str, error: str | None = None) -> None:
        with self._lock:
            h = self.health
            if state != h.state:
                h.since = time.monotonic()
            if state == CONNECTED:
                h.connects += 1
            elif state == DISCONNECTED and h.state == CONNECTED:
                h.disconnects += 1
            h.state = state
            if error is not None:
                h.last_error = error

    def _frame(self, seq: int, frame_id: str, captured_at: float, mono: float) -> Frame:
        return Frame(seq=seq, frame_id=frame_id, source=self.driver.name,
                     captured_at=captured_at, captured_mono=mono)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        seq = 0
        self.backoff.reset()
        while not stop.is_set():
            try:
                self.driver.open()
            except SourceError as exc:
                was = self.health.state
                self._set_state(DISCONNECTED, str(exc))
                if was != DISCONNECTED:
                    log.warning("camera_unavailable", camera=self.driver.name, error=str(exc))
                stop.wait(self.backoff.next_delay())
                continue
            self._set_state(CONNECTED)
            self.backoff.reset()
            log.info("camera_connected", camera=self.driver.name)
            try:
                while not stop.is_set():
                    grab = self.driver.grab()
                    if grab is None:
                        continue
                    now, mono = time.time(), time.monotonic()
                    for skipped_id in grab.skipped_ids:
                        dropped = self._frame(seq, skipped_id, now, mono)
                        dropped.skip_reason = REASON_CAMERA_SKIPPED
                        with self._lock:
                            self.health.camera_skipped += 1
                        yield dropped
                        seq += 1
                    frame = self._frame(seq, grab.frame_id, now, mono)
                    frame.image = grab.image
                    frame.error = grab.error
                    frame.trigger = grab.trigger
                    if grab.error is not None:
                        with self._lock:
                            self.health.grab_failed += 1
                    yield frame
                    seq += 1
            except SourceEnded as exc:
                log.info("source_ended", camera=self.driver.name, detail=str(exc))
                return
            except CameraLost as exc:
                self._set_state(DISCONNECTED, str(exc))
                log.warning("camera_lost", camera=self.driver.name, error=str(exc))
            finally:
                self.driver.close()
