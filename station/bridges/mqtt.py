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

import argparse
import json
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.enums import CallbackAPIVersion

from station.bridges import sparkplug as sp
from station.bridges.feed import FeedEvent, VerdictFeed
from station.contract.counters import Counters
from station.errors import EXIT_OK, ConfigError

log = structlog.get_logger("station.bridge.mqtt")

MAX_QUEUED = 100_000
MAX_INFLIGHT = 1000
COUNTER_NAMES = tuple(Counters().snapshot())


def _broker(url: str) -> tuple[str, int, bool]:
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"--broker {url!r}: use mqtt://host:port or mqtts://host:port")
    tls = u.scheme == "mqtts"
    return u.hostname, u.port or (8883 if tls else 1883), tls


class MqttBridge:
    def __init__(self, args: argparse.Namespace) -> None:
        host, port, tls = _broker(args.broker)
        self.mode: str = args.mode
        self.prefix: str = args.prefix.rstrip("/")
        self.group: str = args.group
        self.node: str = args.node
        self.client_id: str = args.client_id or f"station-bridge-{self.node}"
        self._lock = threading.Lock()  # paho's callbacks run on its network thread
        self._seq = 0
        self.bd_seq = 0
        self.connected = threading.Event()
        self._stations: dict[str, dict[str, Any]] = {}  # station → {"state", "counters", "verdict"}
        self._born: set[str] = set()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311,
                        clean_session=True)
        c.max_queued_messages_set(MAX_QUEUED)
        # paho's default of 20 unacknowledged QoS 1 messages caps a bridge at 20 per round trip: too few for a plant
        c.max_inflight_messages_set(MAX_INFLIGHT)
        c.reconnect_delay_set(1, 30)
        if args.password_file and not args.username:
            raise ConfigError("--password-file needs --username")
        if args.username:
            try:
                password = args.password_file.read_text().strip() if args.password_file else None
            except OSError as exc:
                raise ConfigError(f"--password-file: cannot read {args.password_file}: {exc}") from exc
            c.username_pw_set(args.username, password)
        if tls or args.tls_ca:
            try:
                c.tls_set(ca_certs=str(args.tls_ca) if args.tls_ca else None,
                          certfile=str(args.tls_cert) if args.tls_cert else None,
                          keyfile=str(args.tls_key) if args.tls_key else None, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"--tls-ca/--tls-cert/--tls-key: {exc}") from exc
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        self._set_will()
        try:
            c.connect_async(host, port, keepalive=args.keepalive)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--broker {args.broker}: {exc}") from exc

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
        metrics: list[tuple[str, int, Any]] = [("State", sp.STRING, s.get("state"))]
        counters = s.get("counters") or {}
        metrics += [(f"Counters/{k}", sp.UINT64, int(counters[k]) if isinstance(counters.get(k), int) else None)
                    for k in COUNTER_NAMES]
        if birth or s.get("verdict") is not None:
            metrics += _verdict_metrics(s.get("verdict"))
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
        m = event.message
        station = str(m.get("station"))
        with self._lock:
            s = self._stations.setdefault(station, {"state": None, "counters": {}, "verdict": None})
            if event.kind in ("welcome", "heartbeat"):
                s["state"], s["counters"] = m.get("state"), m.get("counters") or {}
            if event.verdict is not None:
                s["verdict"] = event.verdict
            if self.mode == "json":
                self._json(event, station)
            elif self.connected.is_set():
                self._sparkplug(event, station)

    def _json(self, event: FeedEvent, station: str) -> None:
        s = self._stations[station]
        if event.kind == "verdict":
            self._publish(f"{self.prefix}/{station}/verdict", json.dumps(event.message, separators=(",", ":")).encode())
        else:
            state = {"station": station, "state": s["state"], "counters": s["counters"],
                     "run_id": event.message.get("run_id"), "next_seq": event.message.get("next_seq"),
                     "at": event.message.get("sent_at")}
            self._publish(f"{self.prefix}/{station}/state", json.dumps(state, separators=(",", ":")).encode(),
                          retain=True)

    def _sparkplug(self, event: FeedEvent, station: str) -> None:
        if station not in self._born:
            self._birth_device(station)
            return
        now = int(time.time() * 1000)
        if event.kind == "verdict":
            metrics = _verdict_metrics(event.message)
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


def _verdict_metrics(v: dict[str, Any] | None) -> list[tuple[str, int, Any]]:
    v = v or {}
    raw_cls, raw_anomaly = v.get("class"), v.get("anomaly")
    cls: dict[str, Any] = raw_cls if isinstance(raw_cls, dict) else {}
    anomaly: dict[str, Any] = raw_anomaly if isinstance(raw_anomaly, dict) else {}
    seq = v.get("seq")

    def num(x: Any) -> float | None:
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None

    return [("Last Verdict/seq", sp.UINT64, seq if isinstance(seq, int) and seq >= 0 else None),
            ("Last Verdict/run_id", sp.STRING, v.get("run_id")),
            ("Last Verdict/verdict", sp.STRING, v.get("verdict")),
            ("Last Verdict/reasons", sp.STRING, ",".join(map(str, v.get("reasons") or [])) if v else None),
            ("Last Verdict/class", sp.STRING, cls.get("label")),
            ("Last Verdict/confidence", sp.DOUBLE, num(cls.get("confidence"))),
            ("Last Verdict/anomaly_score", sp.DOUBLE, num(anomaly.get("score"))),
            ("Last Verdict/frame_id", sp.STRING, v.get("frame_id")),
            ("Last Verdict/captured_at", sp.STRING, v.get("captured_at"))]


def run(args: argparse.Namespace, feed: VerdictFeed, stop: threading.Event) -> int:
    bridge = MqttBridge(args)
    bridge.client.loop_start()
    log.info("mqtt_bridge_started", broker=args.broker, mode=args.mode, connect=args.connect)
    try:
        while not stop.is_set():
            event = feed.next(0.2)
            if event is not None:
                bridge.handle(event)
    finally:
        bridge.close()
    log.info("mqtt_bridge_stopped")
    return EXIT_OK
