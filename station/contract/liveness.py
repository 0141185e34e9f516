"""When a reader of the stream counts the station as online: the one rule the bridges and the UI share.

The station heartbeats every ``heartbeat_interval_s`` (configurable up to 60 s), and any message shows it
alive. Silence for three heartbeat intervals, as observed, or for the reader's own floor if that is longer,
and the station counts as offline.
"""

from __future__ import annotations

from dataclasses import dataclass

#: heartbeat intervals of silence after which the station counts as offline
MISSED_HEARTBEATS = 3


def online_window(floor_s: float, heartbeat_interval_s: float) -> float:
    return max(floor_s, MISSED_HEARTBEATS * heartbeat_interval_s)


@dataclass
class Liveness:
    """Last contact and the observed heartbeat interval, on a monotonic clock the caller passes in.

    ``smoothing`` is the weight of the newest interval (1: the last one alone); a reader that shows the
    window smooths it so one late heartbeat does not move it much.
    """

    floor_s: float
    heartbeat_interval_s: float = 0.0
    smoothing: float = 1.0
    last_message: float | None = None
    last_heartbeat: float | None = None

    def heard(self, now: float, heartbeat: bool) -> None:
        self.last_message = now
        if heartbeat:
            if self.last_heartbeat is not None:
                interval = now - self.last_heartbeat
                self.heartbeat_interval_s += self.smoothing * (interval - self.heartbeat_interval_s)
            self.last_heartbeat = now

    @property
    def window_s(self) -> float:
        return online_window(self.floor_s, self.heartbeat_interval_s)

    def silent_s(self, now: float) -> float | None:
        return None if self.last_message is None else now - self.last_message

    def online(self, now: float) -> bool:
        silent = self.silent_s(now)
        return silent is not None and silent < self.window_s
