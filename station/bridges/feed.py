"""The verdict stream as a bridge reads it: one event per message, with gaps and restarts noted.

Each event carries the message as received (``message``, a dict: what ``station subscribe`` prints) and,
for the bridges, the message parsed into its model (``model``; station/contract/messages.py). A message
the model refuses is not the contract this bridge was built for: ``model`` is None and the bridges skip it
(``invalid`` says why, once per event, for their log).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from pydantic import ValidationError

from station.contract.messages import HeartbeatMessage, StationMessage, VerdictMessage, WelcomeMessage
from station.service.publish import SequenceTracker, Subscriber
from station.service.security import ClientKeys

EventKind = Literal["verdict", "heartbeat", "welcome"]
MODELS: dict[str, type[VerdictMessage] | type[HeartbeatMessage] | type[WelcomeMessage]] = {
    "verdict": VerdictMessage, "heartbeat": HeartbeatMessage, "welcome": WelcomeMessage}


@dataclass
class FeedEvent:
    kind: EventKind
    message: dict[str, Any]
    #: gap, reconnect and restart notes from the sequence tracker (also meant for the bridge's log)
    notes: list[str] = field(default_factory=list)

    @cached_property
    def _parsed(self) -> tuple[StationMessage | None, str | None]:
        try:
            return MODELS[self.kind].model_validate(self.message), None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "message"
            return None, f"{exc.error_count()} fields not as station.{self.kind}/1 says, first {where}: {first['msg']}"

    @property
    def model(self) -> StationMessage | None:
        """The message as its model; None when it does not validate (see ``invalid``)."""
        return self._parsed[0]

    @property
    def invalid(self) -> str | None:
        """Why the message does not validate, in one line; None when it does."""
        return self._parsed[1]

    @property
    def verdict(self) -> dict[str, Any] | None:
        """The verdict this event carries: the message itself, or the welcome's last verdict (None before any)."""
        if self.kind == "verdict":
            return self.message
        if self.kind == "welcome":
            last = self.message.get("last_verdict")
            return last if isinstance(last, dict) else None
        return None

    @property
    def verdict_model(self) -> VerdictMessage | None:
        """``verdict`` as its model: a valid verdict, or a valid welcome's last verdict."""
        m = self.model
        if isinstance(m, VerdictMessage):
            return m
        return m.last_verdict if isinstance(m, WelcomeMessage) else None


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
