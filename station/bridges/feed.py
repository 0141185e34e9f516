"""The verdict stream as a bridge reads it: one event per message, with gaps and restarts noted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from station.service.publish import SequenceTracker, Subscriber
from station.service.security import ClientKeys

EventKind = Literal["verdict", "heartbeat", "welcome"]


@dataclass
class FeedEvent:
    kind: EventKind
    message: dict[str, Any]
    #: gap, reconnect and restart notes from the sequence tracker (also meant for the bridge's log)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> dict[str, Any] | None:
        """The verdict this event carries: the message itself, or the welcome's last verdict (None before any)."""
        if self.kind == "verdict":
            return self.message
        if self.kind == "welcome":
            last = self.message.get("last_verdict")
            return last if isinstance(last, dict) else None
        return None


class VerdictFeed:
    def __init__(self, endpoint: str, station: str | None = None, curve: ClientKeys | None = None) -> None:
        self.subscriber = Subscriber(endpoint, station=station, curve=curve)
        self.tracker = SequenceTracker()

    def next(self, timeout_s: float | None) -> FeedEvent | None:
        """The next event, or None after ``timeout_s`` seconds of silence."""
        item = self.subscriber.receive(timeout_s)
        if item is None:
            return None
        m = item.message
        kind = item.topic.split(".", 1)[0]
        if kind == "welcome":
            return FeedEvent("welcome", m, self.tracker.join(str(m.get("run_id")), int(m.get("next_seq", 0))))
        if kind == "heartbeat":
            return FeedEvent("heartbeat", m)
        return FeedEvent("verdict", m, self.tracker.observe(str(m.get("run_id")), int(m.get("seq", -1))))

    def close(self) -> None:
        self.subscriber.close()
