"""MQTT bridge: verdicts and station state into the plant's broker, as plain JSON or Sparkplug B.

``--mode json`` (default): each verdict as published by the station on
``<prefix>/<station>/verdict`` (QoS 1, not retained: a consumer wants each
bottle once), the station's state and counters on ``<prefix>/<station>/state``
(QoS 1, retained: a dashboard that connects later sees the current state at
once). The bridge itself is ``<prefix>/_bridge/<client-id>`` = ``online``,
retained, with ``offline`` as its last will.

``--mode sparkplug``: Sparkplug B 3.0 with the bridge as edge node
``<node>`` in group ``<group>`` and each station as a device. NBIRTH on
every (re)connect with a fresh ``bdSeq``; the broker's last will is the
matching NDEATH, so a bridge killed outright is still reported dead. A
station's DBIRTH (its counters, state and last verdict) is sent when it is
first heard of and after every NBIRTH; DDATA carries changes: the last
verdict on each verdict, state and counters on each heartbeat. ``seq`` runs
0…255 across all of the node's messages, as the spec asks. An NCMD
``Node Control/Rebirth`` = true makes the node send its births again.
Payloads: station/bridges/sparkplug.py.

QoS 1 messages published while the broker is unreachable are queued by the
client (up to MAX_QUEUED) and sent on reconnect; past that paho drops them
and the bridge logs ``mqtt_queue_full``.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from station.bridges import sparkplug as sp
from station.bridges.feed import FeedEvent, VerdictFeed
from station.contract.counters import COUNTER_KEYS, Counters
from station.contract.messages import HeartbeatMessage, VerdictMessage
from station.errors import EXIT_OK, ConfigError

log = structlog.get_logger("station.bridge.mqtt")

MAX_QUEUED = 100_000
MAX_INFLIGHT = 1000
COUNTER_NAMES = COUNTER_KEYS


@dataclass(frozen=True)
class MqttOptions:
    """``station bridge mqtt``'s options."""

    #: mqtt://host:port, or mqtts://host:port for TLS
    broker: str
    mode: str = "json"
    #: json mode: topics are PREFIX/<station>/verdict|state
    prefix: str = "station"
    #: sparkplug mode: the Sparkplug group id and the edge node id (the bridge)
    group: str = "bottling"
    node: str = "station-bridge"
    #: default: station-bridge-NODE
    client_id: str | None = None
    username: str | None = None
    #: the file holding the password (not on argv)
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: seconds; the will fires after 1.5x
    keepalive: int = 15
    #: the stations' endpoints, for the log
    connect: str | list[str] = ""


@dataclass
class _Station:
    """What the bridge last heard of one station."""

    state: str | None = None
    counters: Counters | None = None
    verdict: VerdictMessage | None = None


def _broker(url: str) -> tuple[str, int, bool]:
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"--broker {url!r}: use mqtt://host:port or mqtts://host:port")
    tls = u.scheme == "mqtts"
    return u.hostname, u.port or (8883 if tls else 1883), tls


class MqttBridge:
    def __init__(self, options: MqttOptions) -> None:
        host, port, tls = _broker(options.broker)
        self.mode: str = options.mode
        self.prefix: str = options.prefix.rstrip("/")
        self.group: str = options.group
        self.node: str = options.node
        self.client_id: str = options.client_id or f"station-bridge-{self.node}"
        self._lock = threading.Lock()  # paho's callbacks run on its network thread
        self._seq = 0
        self.bd_seq = 0
        self.connected = threading.Event()
        self._stations: dict[str, _Station] = {}
        self._born: set[str] = set()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311,
                        clean_session=True)
        c.max_queued_messages_set(MAX_QUEUED)
        # paho's default of 20 unacknowledged QoS 1 messages caps a bridge at 20 per round trip: too few for a plant
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.reconnect_delay_set(1, 30)
        if options.password_file and not options.username:
            raise ConfigError("--password-file needs --username")
        if options.username:
            try:
                password = options.password_file.read_text().strip() if options.password_file else None
            except OSError as exc:
                raise ConfigError(f"--password-file: cannot read {options.password_file}: {exc}") from exc
            c.username_pw_set(options.username, password)
        if tls or options.tls_ca:
            try:
                c.tls_set(ca_certs=str(options.tls_ca) if options.tls_ca else None,
                          certfile=str(options.tls_cert) if options.tls_cert else None,
                          keyfile=str(options.tls_key) if options.tls_key else None, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"--tls-ca/--tls-cert/--tls-key: {exc}") from exc
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        self._set_will()
        try:
            c.connect_async(host, port, keepalive=options.keepalive)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--broker {options.broker}: {exc}") from exc

    # --- topics and payloads -------------------------------------------------------------

    def _sp_topic(self, kind: str, device: str | None = None) -> str:
        return f"spBv1.0/{self.group}/{kind}/{self.node}" + (f"/{device}" if device else "")

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq = (self._seq + 1) % 256
        return seq

    def _set_will(self) -> None:
        if self.mode == "sparkplug":
            death = sp.payload(int(time.time() * 1000), [("bdSeq", sp.UINT64, self.bd_seq)], None)
            self.client.will_set(self._sp_topic("NDEATH"), death, qos=1, retain=False)
        else:
            self.client.will_set(f"{self.prefix}/_bridge/{self.client_id}", b"offline", qos=1, retain=True)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            log.error("mqtt_queue_full", topic=topic, queued=MAX_QUEUED)

    def _device_metrics(self, station: str, birth: bool) -> list[tuple[str, int, Any]]:
        s = self._stations[station]
        metrics: list[tuple[str, int, Any]] = [("State", sp.STRING, s.state)]
        metrics += [(f"Counters/{k}", sp.UINT64, getattr(s.counters, k) if s.counters is not None else None)
                    for k in COUNTER_NAMES]
        if birth or s.verdict is not None:
            metrics += _verdict_metrics(s.verdict)
        return metrics

    def _birth_node(self) -> None:
        self._seq = 0
        now = int(time.time() * 1000)
        self._publish(self._sp_topic("NBIRTH"), sp.payload(now, [
            ("bdSeq", sp.UINT64, self.bd_seq), ("Node Control/Rebirth", sp.BOOLEAN, False)], self._next_seq()))
        self._born.clear()
        for station in self._stations:
            self._birth_device(station)

    def _birth_device(self, station: str) -> None:
        self._publish(self._sp_topic("DBIRTH", station),
                      sp.payload(int(time.time() * 1000), self._device_metrics(station, True), self._next_seq()))
        self._born.add(station)

    # --- paho callbacks (network thread) ---------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("mqtt_connect_refused", reason=str(reason))
            return
        log.info("mqtt_connected", mode=self.mode, client_id=self.client_id)
        with self._lock:
            if self.mode == "sparkplug":
                client.subscribe(self._sp_topic("NCMD"), qos=1)
                self._birth_node()
            else:
                self._publish(f"{self.prefix}/_bridge/{self.client_id}", b"online", retain=True)
        self.connected.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self.connected.clear()
        log.warning("mqtt_disconnected", reason=str(reason))
        with self._lock:
            # A new MQTT session is a new birth/death pair: the will paho sends on reconnect must match it.
            self.bd_seq = (self.bd_seq + 1) % 256
            self._set_will()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            metrics = sp.decode(bytes(msg.payload))["metrics"]
        except Exception as exc:  # a malformed command from the plant network must not stop the bridge
            log.warning("mqtt_bad_command", topic=msg.topic, error=str(exc)[:160])
            return
        if metrics.get("Node Control/Rebirth") is True:
            log.info("mqtt_rebirth_requested")
            with self._lock:
                self._birth_node()

    # --- the stream (feed thread) ------------------------------------------------------------

    def handle(self, event: FeedEvent) -> None:
        m = event.model
        if m is None:
            log.warning("message_ignored", kind=event.kind, reason=event.invalid)
            return
        station = m.station
        with self._lock:
            s = self._stations.setdefault(station, _Station())
            if not isinstance(m, VerdictMessage):
                s.state, s.counters = m.state, m.counters
            if event.verdict_model is not None:
                s.verdict = event.verdict_model
            if self.mode == "json":
                self._json(event, station)
            elif self.connected.is_set():
                self._sparkplug(event, station)

    def _json(self, event: FeedEvent, station: str) -> None:
        s, m = self._stations[station], event.model
        if isinstance(m, VerdictMessage):
            self._publish(f"{self.prefix}/{station}/verdict", _json(m.model_dump(mode="json", by_alias=True)))
        elif m is not None:
            state = {"station": station, "state": s.state,
                     "counters": s.counters.snapshot() if s.counters is not None else {},
                     "run_id": m.run_id, "next_seq": m.next_seq,
                     "at": m.sent_at if isinstance(m, HeartbeatMessage) else None}
            self._publish(f"{self.prefix}/{station}/state", _json(state), retain=True)

    def _sparkplug(self, event: FeedEvent, station: str) -> None:
        if station not in self._born:
            self._birth_device(station)
            return
        now = int(time.time() * 1000)
        if isinstance(event.model, VerdictMessage):
            metrics = _verdict_metrics(event.model)
        else:
            metrics = self._device_metrics(station, False)[:1 + len(COUNTER_NAMES)]
        self._publish(self._sp_topic("DDATA", station), sp.payload(now, metrics, self._next_seq()))

    def close(self) -> None:
        with self._lock:
            if self.mode == "sparkplug" and self.connected.is_set():
                # A clean stop says so itself: the broker does not send the will after a DISCONNECT.
                death = sp.payload(int(time.time() * 1000), [("bdSeq", sp.UINT64, self.bd_seq)], None)
                self.client.publish(self._sp_topic("NDEATH"), death, qos=1).wait_for_publish(5)
            elif self.mode == "json" and self.connected.is_set():
                self.client.publish(f"{self.prefix}/_bridge/{self.client_id}", b"offline", qos=1,
                                    retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


def _json(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _verdict_metrics(v: VerdictMessage | None) -> list[tuple[str, int, Any]]:
    """The Last Verdict metrics; all null (typed) before the station's first verdict."""
    if v is None:
        return [("Last Verdict/seq", sp.UINT64, None), ("Last Verdict/run_id", sp.STRING, None),
                ("Last Verdict/verdict", sp.STRING, None), ("Last Verdict/reasons", sp.STRING, None),
                ("Last Verdict/class", sp.STRING, None), ("Last Verdict/confidence", sp.DOUBLE, None),
                ("Last Verdict/anomaly_score", sp.DOUBLE, None), ("Last Verdict/frame_id", sp.STRING, None),
                ("Last Verdict/captured_at", sp.STRING, None)]
    cls, anomaly = v.class_, v.anomaly
    return [("Last Verdict/seq", sp.UINT64, v.seq),
            ("Last Verdict/run_id", sp.STRING, v.run_id),
            ("Last Verdict/verdict", sp.STRING, v.verdict),
            ("Last Verdict/reasons", sp.STRING, ",".join(v.reasons)),
            ("Last Verdict/class", sp.STRING, cls.label if cls is not None else None),
            ("Last Verdict/confidence", sp.DOUBLE, float(cls.confidence) if cls is not None else None),
            ("Last Verdict/anomaly_score", sp.DOUBLE, float(anomaly.score) if anomaly is not None else None),
            ("Last Verdict/frame_id", sp.STRING, v.frame_id),
            ("Last Verdict/captured_at", sp.STRING, v.captured_at)]


def run(options: MqttOptions, feed: VerdictFeed, stop: threading.Event) -> int:
    bridge = MqttBridge(options)
    bridge.client.loop_start()
    log.info("mqtt_bridge_started", broker=options.broker, mode=options.mode, connect=options.connect)
    try:
        while not stop.is_set():
            event = feed.next(0.2)
            if event is not None:
                bridge.handle(event)
    finally:
        bridge.close()
    log.info("mqtt_bridge_stopped")
    return EXIT_OK
