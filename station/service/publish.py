"""ZeroMQ publishing of verdicts and heartbeats, and the subscriber side.

Wire format: multipart ``[topic, payload]``; topics ``verdict.<station_id>``
and ``heartbeat.<station_id>``; payload UTF-8 JSON. A (re)connecting
subscriber is greeted with one single-frame message, ``welcome.<station_id>``,
a space, then JSON: the last verdict, the next seq and the current counters,
so a bridge that joins mid-shift is current at once (ZMQ_XPUB_WELCOME_MSG,
updated after every verdict and heartbeat).

Both ends run ZMTP heartbeats, so a peer that vanished without closing (a
pulled cable, a killed VM) is noticed within HEARTBEAT_TIMEOUT_MS and its
pipe dropped, and a subscriber reconnects on its own.

A subscriber that falls behind by SEND_HWM messages loses verdicts, silently
at the ZeroMQ level (XPUB_NODROP would make the station wait for the slowest
bridge instead, which a line cannot afford). Every verdict carries ``seq``, so
the loss is visible on the subscriber's side as a gap, and ``station
subscribe`` and the bridges report it.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from station.contract.counters import Counters
from station.contract.messages import HeartbeatMessage, WelcomeMessage, encode, encode_model
from station.contract.timefmt import iso_utc
from station.core.verdict import Verdict
from station.errors import PublishError
from station.service.security import ClientKeys, CurveServer, ServerKeys, apply_client

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000

# What a subscriber may send the station: subscriptions, one byte and a topic. A peer that sends
# more (a bigger message, garbage) is disconnected by ZeroMQ before the message is held in memory.
MAX_INBOUND_BYTES = 4096
# What a bridge accepts from a station: verdicts and welcomes are a few KiB.
MAX_VERDICT_BYTES = 1 << 20

# Room for a burst of verdicts to a briefly slow subscriber; past it ZeroMQ drops
# for that subscriber, and the subscriber sees the gap in ``seq``.
SEND_HWM = 100_000


def verdict_topic(station: str) -> str:
    return f"verdict.{station}"


def heartbeat_topic(station: str) -> str:
    return f"heartbeat.{station}"


def welcome_topic(station: str) -> str:
    return f"welcome.{station}"


def _zmtp_heartbeats(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


class VerdictPublisher:
    """XPUB socket bound to ``endpoint``; stamps seq and published_at on each verdict.

    XPUB rather than PUB so the station sees subscriptions arrive, which lets
    replay hold its first verdict until the expected subscribers are connected.
    """

    def __init__(self, endpoint: str, station: str, run_id: str, context: zmq.Context[Any] | None = None,
                 curve: ServerKeys | None = None):
        self.station = station
        self.run_id = run_id
        self.seq = 0
        self._verdict_topic = verdict_topic(station).encode()
        self._heartbeat_topic = heartbeat_topic(station).encode()
        self._welcome_topic = welcome_topic(station).encode()
        self._last_verdict: bytes = b"null"
        # A subscriber that joins before the first heartbeat still gets every counter (all zero).
        self._state = "starting"
        self._counters = Counters()
        self._ctx = context or zmq.Context.instance()
        self._curve = CurveServer(curve, self._ctx) if curve is not None else None
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_BYTES)
        # Deliver every subscription message, also repeats of a topic another
        # subscriber already holds, so each subscriber is counted.
        self._sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._sock.setsockopt(zmq.LINGER, 2000)
        _zmtp_heartbeats(self._sock)
        if self._curve is not None:
            self._curve.apply(self._sock)
        self._update_welcome()
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            if self._curve is not None:
                self._curve.stop()
            raise PublishError(f"cannot bind {endpoint}: {exc}") from exc
        self.endpoint = endpoint
        self.subscribers = 0

    def _update_welcome(self) -> None:
        welcome = WelcomeMessage.model_validate({"station": self.station, "run_id": self.run_id, "next_seq": self.seq,
                                                 "state": self._state, "counters": self._counters,
                                                 "last_verdict": None})
        # ASCII-escaped, unlike verdicts and heartbeats: the welcome's head has always been.
        head = json.dumps(welcome.model_dump(mode="json", by_alias=True, exclude={"last_verdict"}),
                          separators=(",", ":"))
        # The last verdict is spliced in as already encoded, rather than decoded and encoded again.
        body = head[:-1].encode() + b',"last_verdict":' + self._last_verdict + b"}"
        self._sock.setsockopt(zmq.XPUB_WELCOME_MSG, self._welcome_topic + b" " + body)

    def _drain_subscriptions(self, timeout_ms: int = 0) -> None:
        wanted = (self._verdict_topic, b"verdict.", b"verdict", b"")
        while self._sock.poll(timeout_ms, zmq.POLLIN):
            msg = self._sock.recv()
            timeout_ms = 0
            if not msg:
                continue
            topic = msg[1:]
            if topic in wanted or self._verdict_topic.startswith(topic):
                if msg[0] == 1:
                    self.subscribers += 1
                elif msg[0] == 0:
                    self.subscribers = max(0, self.subscribers - 1)

    def service(self) -> None:
        """Let ZeroMQ attach new subscribers now, so each gets its welcome without waiting for a send.

        libzmq attaches a new pipe, and sends it the welcome, only when the
        socket is next used; the station calls this from its loop between
        verdicts, so a bridge joining an idle station is greeted at once.
        """
        self._drain_subscriptions()

    def wait_for_subscribers(self, n: int, timeout_s: float, stop: threading.Event | None = None) -> int:
        """Block until ``n`` verdict subscriptions have arrived, ``timeout_s`` passes or ``stop`` is set."""
        deadline = time.monotonic() + timeout_s
        while self.subscribers < n and not (stop is not None and stop.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._drain_subscriptions(int(min(left, 0.2) * 1000) + 1)
        # A subscription arrives once the subscriber's pipe is attached, so a
        # message sent now reaches it; no extra settle time is needed.
        return self.subscribers

    def publish(self, verdict: Verdict, counters: dict[str, int] | None = None) -> dict[str, Any]:
        """Send one verdict; ``counters`` (the station's, this verdict counted) go into the welcome."""
        model = verdict.to_model(self.station, self.run_id, self.seq, time.time())
        message = model.model_dump(mode="json", by_alias=True)
        payload = encode(message)
        self._sock.send_multipart([self._verdict_topic, payload])
        self.seq += 1
        self._last_verdict = payload
        if counters is not None:
            self._counters = Counters(**counters)
        self._update_welcome()
        self._drain_subscriptions()
        return message

    def heartbeat(self, state: str, counters: dict[str, int], fps: float, extra: dict[str, Any] | None = None) -> None:
        """``extra``: the heartbeat's ``drift`` and, with a camera source, ``camera``."""
        message = HeartbeatMessage.model_validate({
            "station": self.station,
            "run_id": self.run_id,
            "state": state,
            "sent_at": iso_utc(time.time()),
            "next_seq": self.seq,
            "counters": counters,
            "fps": round(fps, 3),
            **(extra or {}),
        })
        self._sock.send_multipart([self._heartbeat_topic, encode_model(message)])
        self._state, self._counters = message.state, message.counters
        self._update_welcome()

    def close(self) -> None:
        self._sock.close()
        if self._curve is not None:
            self._curve.stop()


@dataclass
class Received:
    topic: str
    message: dict[str, Any]


class Subscriber:
    """SUB socket connected to a station; yields decoded verdicts and heartbeats."""

    def __init__(self, endpoint: str, station: str | None = None, heartbeats: bool = True,
                 context: zmq.Context[Any] | None = None, curve: ClientKeys | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, SEND_HWM)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_VERDICT_BYTES)
        _zmtp_heartbeats(self._sock)
        if curve is not None:
            try:
                apply_client(self._sock, curve)
            except Exception:
                self._sock.close(0)
                raise
        suffix = station or ""
        self._sock.setsockopt(zmq.SUBSCRIBE, f"verdict.{suffix}".encode())
        self._sock.setsockopt(zmq.SUBSCRIBE, f"welcome.{suffix}".encode())
        if heartbeats:
            self._sock.setsockopt(zmq.SUBSCRIBE, f"heartbeat.{suffix}".encode())
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close(0)
            raise PublishError(f"cannot connect to {endpoint}: {exc}") from exc

    def receive(self, timeout_s: float | None) -> Received | None:
        """The next message, or None after ``timeout_s`` seconds of silence."""
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        if not self._sock.poll(timeout_ms, zmq.POLLIN):
            return None
        parts = self._sock.recv_multipart()
        if len(parts) == 1:  # the welcome: "welcome.<station> {json}" in one frame
            head, _, body = parts[0].partition(b" ")
            parts = [head, body]
        topic = parts[0].decode("utf-8", "replace")
        try:
            message = json.loads(parts[-1].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            message = {"_undecodable": parts[-1][:200].decode("utf-8", "replace")}
        return Received(topic, message)

    def close(self) -> None:
        self._sock.close(0)


class SequenceTracker:
    """Detects lost verdicts (seq gaps) and station restarts (new run_id)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.expected = 0
        self.gaps = 0
        self.missed = 0

    def _lost(self, n: int, note: str) -> list[str]:
        self.gaps += 1
        self.missed += n
        return [note]

    def _new_run(self, run_id: str, first_seq: int) -> list[str]:
        """A run_id not seen before, whose first message here has seq ``first_seq``."""
        notes: list[str] = []
        if self.run_id is not None:
            notes.append(f"new run_id {run_id} (was {self.run_id}): the station restarted")
            if first_seq > 0:  # the new run's first verdicts went by before we heard from it
                notes += self._lost(first_seq, f"{first_seq} verdicts of the new run were missed "
                                               f"(seq 0…{first_seq - 1})")
        elif first_seq > 0:
            notes.append(f"joined run {run_id} at seq {first_seq}")
        self.run_id = run_id
        return notes

    def join(self, run_id: str, next_seq: int) -> list[str]:
        """A welcome: the station says which seq comes next (on first connect and on every reconnect)."""
        if run_id != self.run_id:
            notes = self._new_run(run_id, next_seq)
        elif next_seq > self.expected:
            lost = next_seq - self.expected
            notes = self._lost(lost, f"reconnected: {lost} verdicts published while disconnected "
                                     f"(seq {self.expected}…{next_seq - 1})")
        else:
            notes = []
        # The welcome is the first message on a connection: what follows starts at next_seq.
        self.expected = next_seq
        return notes

    def observe(self, run_id: str, seq: int) -> list[str]:
        if run_id != self.run_id:
            notes = self._new_run(run_id, seq)
        elif seq > self.expected:
            lost = seq - self.expected
            notes = self._lost(lost, f"seq gap: expected {self.expected}, got {seq} ({lost} verdicts missed)")
        elif seq < self.expected:
            notes = [f"seq went back: expected {self.expected}, got {seq}"]
        else:
            notes = []
        self.expected = seq + 1
        return notes
