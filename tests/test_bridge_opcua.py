"""The OPC UA bridge as a PLC meets it: a real `station bridge opcua` process, read with asyncua's Client."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pytest
import structlog
import zmq
from asyncua import Client, Node, ua
from asyncua.common.subscription import DataChangeNotif
from asyncua.ua.object_ids import ObjectIds

from station.bridges.feed import FeedEvent
from station.bridges.opcua import NAMESPACE_URI, StationView, asyncua_logs_as_lines
from station.service.publish import SequenceTracker
from tests.conftest import free_endpoint, run_station, start_bridge, stop_bridge
from tests.stationproc import StationProcess
from tests.test_verdict_stream import _drop

Message = dict[str, Any]


def _free_opcua_url() -> str:
    return f"opc.tcp://127.0.0.1:{free_endpoint().rsplit(':', 1)[1]}/station/"


def _bridge(endpoint: str, url: str, *extra: str) -> subprocess.Popen[str]:
    return start_bridge("opcua", endpoint, "--listen", url, *extra)


def _stop(bridge: subprocess.Popen[str]) -> str:
    return stop_bridge(bridge, "opcua_bridge_stopped")


def _alive(bridge: subprocess.Popen[str]) -> None:
    if bridge.poll() is not None:
        raise AssertionError(f"bridge exited {bridge.returncode}: {bridge.communicate()[1][-3000:]}")


class Plc:
    """An OPC UA client reading the bridge's nodes by their string NodeIds, as a PLC program would."""

    def __init__(self, client: Client, idx: int, bridge: subprocess.Popen[str]) -> None:
        self.client, self.idx, self.bridge = client, idx, bridge

    def node(self, path: str) -> Node:
        return self.client.get_node(f"ns={self.idx};s=Station.{path}")

    async def read(self, *paths: str) -> dict[str, Any]:
        values = await self.client.read_values([self.node(p) for p in paths])
        return dict(zip(paths, values, strict=True))

    async def until(self, what: str, predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30) -> None:
        # The bridge applies the stream asynchronously to the reads: poll, with a deadline.
        deadline = time.monotonic() + timeout_s
        while not await predicate():
            _alive(self.bridge)
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def _plc(url: str, bridge: subprocess.Popen[str], timeout_s: float = 30) -> AsyncIterator[Plc]:
    deadline = time.monotonic() + timeout_s
    while True:
        client = Client(url, timeout=5)
        try:
            await client.connect()
            break
        except (OSError, asyncio.TimeoutError):
            _alive(bridge)
            assert time.monotonic() < deadline, f"{url} never came up"
            await asyncio.sleep(0.1)
    try:
        yield Plc(client, await client.get_namespace_index(NAMESPACE_URI), bridge)
    finally:
        await client.disconnect()


class Changes:
    """Data-change notifications of one node, in order, with the server's timestamps (asyncua's handler protocol)."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.times: list[datetime] = []

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        self.values.append(val)
        self.times.append(data.monitored_item.Value.SourceTimestamp)

    def highs(self) -> list[float]:
        """How long each rise to true lasted, in seconds."""
        edges = list(zip(self.values, self.times, strict=True))
        return [(fall_t - rise_t).total_seconds() for (was, _), (rise, rise_t), (fall, fall_t)
                in zip(edges, edges[1:], edges[2:], strict=False) if rise and not was and not fall]


def test_replay_through_the_bridge_counts_every_bottle_and_pulses_on_fails(bundle: Path, eval_root: Path,
                                                                          tmp_path: Path) -> None:
    endpoint, url, out = free_endpoint(), _free_opcua_url(), tmp_path / "v.jsonl"
    bridge = _bridge(endpoint, url, "--reject-pulse-ms", "300")

    async def scenario() -> None:
        async with _plc(url, bridge) as plc:
            pulses = Changes()
            subscription = await plc.client.create_subscription(20, pulses)
            await subscription.subscribe_data_change(plc.node("RejectPulse"))
            # The replay waits for the bridge's ZeroMQ subscription; the PLC is watching before the first bottle.
            replay = await asyncio.to_thread(
                run_station, "replay", "--model", str(bundle), "--source", str(eval_root), "--publish", endpoint,
                "--wait-subscribers", "1", "--station-id", "line1", "--out", str(out), timeout=120)
            assert replay.returncode == 0, replay.stderr
            published = [json.loads(line) for line in out.read_text().splitlines()]
            fails = [m for m in published if m["verdict"] == "fail"]
            assert len(published) == 12 and fails, "the eval set has defects: some bottles must fail"

            async def all_counted() -> bool:
                return (await plc.read("WS_Tot_Containers"))["WS_Tot_Containers"] == len(published)

            await plc.until("every bottle counted", all_counted)
            got = await plc.read("WS_Tot_Containers", "WS_Good_Containers", "WS_Tot_Rej", "RejectCount",
                                 "RejectSeq", "LastVerdict.Seq", "LastVerdict.Verdict", "LastVerdict.FrameId",
                                 "LastVerdict.RunId", "LastVerdict.Json", "LastVerdict.CapturedAt", "StationId",
                                 "Counters.Published", "Counters.Failed", "Stream.Gaps", "Stream.Missed")
            last = published[-1]
            assert got["WS_Tot_Rej"] == got["Counters.Failed"] == got["RejectCount"] == len(fails)
            assert got["WS_Good_Containers"] == sum(m["verdict"] == "pass" for m in published)
            assert got["LastVerdict.Seq"] == len(published) - 1 == last["seq"]
            assert got["RejectSeq"] == fails[-1]["seq"]
            assert (got["LastVerdict.Verdict"], got["LastVerdict.FrameId"], got["LastVerdict.RunId"]) == \
                (last["verdict"], last["frame_id"], last["run_id"])
            assert json.loads(got["LastVerdict.Json"]) == last
            assert got["LastVerdict.CapturedAt"].strftime("%Y-%m-%dT%H:%M:%S") == last["captured_at"][:19]
            assert got["StationId"] == "line1" and got["Stream.Gaps"] == got["Stream.Missed"] == 0

            async def stopped_and_pulse_low() -> bool:
                now = await plc.read("State", "WS_Cur_State", "RejectPulse")
                return now == {"State": "stopped", "WS_Cur_State": 1, "RejectPulse": False}

            await plc.until("the stopped heartbeat and the pulse back low", stopped_and_pulse_low)

            async def subscription_saw_it_low() -> bool:
                # Data-change notifications come on the subscription's own publishing cycle, after a read.
                return bool(pulses.values) and pulses.values[-1] is False

            await plc.until("the subscription to report the pulse low", subscription_saw_it_low)
            await subscription.delete()
            # Overlapping fails extend one pulse rather than each making its own edge; each lasts the 300 ms.
            highs = pulses.highs()
            assert pulses.values[0] is False and pulses.values[-1] is False, pulses.values
            assert 1 <= len(highs) <= len(fails) and min(highs) >= 0.29, (highs, pulses.values)

    try:
        asyncio.run(scenario())
        _stop(bridge)
    finally:
        bridge.kill()


def test_a_late_joiner_is_current_from_the_welcome_without_a_pulse(bundle: Path, eval_root: Path,
                                                                   tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    station = StationProcess(tmp_path, {"model": str(bundle),
                                        "source": {"path": str(incoming), "poll_interval_s": 0.05}})
    url = _free_opcua_url()
    bridge: subprocess.Popen[str] | None = None
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        images = [*sorted((eval_root / "broken_large").iterdir()), *sorted((eval_root / "good").iterdir())]
        _drop(images[:3], incoming)
        early = station.wait_verdicts(3)
        bridge = _bridge(station.endpoint, url)
        asyncio.run(_late_join(url, bridge, early))
        _drop(images[3:4], incoming, start=3)
        verdicts = station.wait_verdicts(4)
        asyncio.run(_live_after_welcome(url, bridge, verdicts))
        rc, _, err = station.terminate()
        assert rc == 0, err
        _stop(bridge)
    finally:
        if bridge is not None:
            bridge.kill()
        station.close()


async def _late_join(url: str, bridge: subprocess.Popen[str], early: list[Message]) -> None:
    async with _plc(url, bridge) as plc:
        async def welcomed() -> bool:
            return (await plc.read("LastVerdict.Json"))["LastVerdict.Json"] != ""

        await plc.until("the welcome's last verdict", welcomed)
        got = await plc.read("LastVerdict.Json", "LastVerdict.Seq", "WS_Tot_Containers", "WS_Tot_Rej",
                             "WS_Cur_State", "State", "NextSeq", "Stream.Online", "RejectCount", "RejectPulse")
        fails = sum(m["verdict"] == "fail" for m in early)
        assert json.loads(got.pop("LastVerdict.Json")) == early[-1]
        assert got == {"LastVerdict.Seq": 2, "WS_Tot_Containers": 3, "WS_Tot_Rej": fails, "WS_Cur_State": 128,
                       "State": "running", "NextSeq": 3, "Stream.Online": True,
                       # the welcome's verdict is old news: shown, never pulsed
                       "RejectCount": 0, "RejectPulse": False}


async def _live_after_welcome(url: str, bridge: subprocess.Popen[str], verdicts: list[Message]) -> None:
    async with _plc(url, bridge) as plc:
        async def fourth() -> bool:
            return (await plc.read("LastVerdict.Seq"))["LastVerdict.Seq"] == 3

        await plc.until("the first verdict after the welcome", fourth)
        got = await plc.read("WS_Tot_Containers", "RejectCount", "LastVerdict.FrameId")
        assert got == {"WS_Tot_Containers": 4, "RejectCount": int(verdicts[3]["verdict"] == "fail"),
                       "LastVerdict.FrameId": verdicts[3]["frame_id"]}


def _message(**fields: Any) -> Message:
    """A verdict with every field station.verdict/1 requires; ``fields`` replace some."""
    return {"schema": "station.verdict/1", "station": "x", "run_id": "r1", "seq": 0, "frame_id": "f.png",
            "source": "test", "captured_at": "2026-12-02T05:00:00.000Z", "trigger": None,
            "published_at": "2026-12-02T05:00:00.001Z", "verdict": "pass", "reasons": [], "class": None,
            "anomaly": None, "error": None, "latency_ms": {}, "model": {"name": "t", "version": "1"}, "truth": None,
            **fields}


def _status(kind: Literal["welcome", "heartbeat"], run_id: str, next_seq: int, published: int,
            failed: int = 0) -> FeedEvent:
    counters = {"captured": published, "published": published, "inspected": published, "passed": published - failed,
                "failed": failed, "skipped": 0, "errors": 0}
    extra = {"last_verdict": None} if kind == "welcome" else {"sent_at": "2026-12-02T05:00:00.000Z", "fps": 1.0}
    return FeedEvent(kind, {"schema": f"station.{kind}/1", "run_id": run_id, "next_seq": next_seq,
                            "state": "running", "counters": counters, "station": "s", **extra})


def _verdict(run_id: str, seq: int, verdict: str) -> FeedEvent:
    return FeedEvent("verdict", _message(run_id=run_id, seq=seq, verdict=verdict))


def test_counters_step_with_each_verdict_never_go_back_and_restart_with_a_new_run() -> None:
    view, tracker = StationView(), SequenceTracker()
    assert view.apply(_status("welcome", "r1", 5, published=5, failed=1), tracker, 0.0) is False
    assert view.apply(_verdict("r1", 5, "fail"), tracker, 0.1) is True
    assert view.apply(_verdict("r1", 6, "pass"), tracker, 0.2) is False
    assert (view.values["WS_Tot_Containers"], view.values["WS_Tot_Rej"], view.values["NextSeq"]) == (7, 2, 7)
    view.apply(_status("heartbeat", "r1", 6, published=6, failed=2), tracker, 0.3)  # sent before seq 6 arrived
    assert (view.values["WS_Tot_Containers"], view.values["WS_Tot_Rej"]) == (7, 2)
    assert view.apply(_verdict("r1", 6, "fail"), tracker, 0.4) is False  # already counted: no second pulse
    view.apply(_status("welcome", "r2", 0, published=0), tracker, 0.5)  # the station restarted
    assert (view.values["WS_Tot_Containers"], view.values["RunId"], view.values["NextSeq"]) == (0, "r2", 0)
    assert view.values["RejectCount"] == 1  # the bridge's own count carries on across station restarts
    view.tick(0.5 + 60)
    assert (view.values["Stream.Online"], view.values["WS_Cur_State"]) == (False, 0)


def test_a_bad_listen_url_exits_2_and_a_taken_port_exits_1_naming_it() -> None:
    endpoint = free_endpoint()
    bad = run_station("bridge", "opcua", "--connect", endpoint, "--listen", "http://0.0.0.0:4840/", timeout=60)
    assert bad.returncode == 2 and "--listen 'http://0.0.0.0:4840/'" in bad.stderr, bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"opc.tcp://127.0.0.1:{taken.getsockname()[1]}/station/"
        busy = run_station("bridge", "opcua", "--connect", endpoint, "--listen", url, timeout=60)
    assert busy.returncode == 1 and f"--listen {url}: cannot listen" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr


# -- seq 0, the first bottle of every run -------------------------------------------


def _welcome(run_id: str) -> Message:
    zeros = dict.fromkeys(("captured", "inspected", "skipped", "errors", "published", "passed", "failed"), 0)
    return {"schema": "station.welcome/1", "station": "x", "run_id": run_id, "next_seq": 0, "state": "running",
            "counters": zeros, "last_verdict": None}


def _publisher(endpoint: str, welcome: Message) -> zmq.Socket[bytes]:
    """A station's verdict socket as the bridge sees it, driven by hand: exact runs and seqs, no model."""
    pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.XPUB_WELCOME_MSG, b"welcome.x " + json.dumps(welcome).encode())
    pub.bind(endpoint)
    return pub


def _fail(run_id: str, seq: int) -> list[bytes]:
    message = _message(run_id=run_id, seq=seq, verdict="fail", reasons=["anomaly"],
                       **{"class": {"label": "good", "confidence": 0.75, "scores": {"good": 0.75}}},
                       anomaly={"score": 9.5, "threshold": 5.0,
                                "region": {"bbox": None, "area_px": 0, "area_fraction": 0.0}})
    return [b"verdict.x", json.dumps(message).encode()]


class Statuses:
    """Data-change notifications of some nodes, in order: (path, status name, value)."""

    def __init__(self, plc: Plc, *paths: str) -> None:
        self.nodes = {path: plc.node(path) for path in paths}
        self.names = {node.nodeid: path for path, node in self.nodes.items()}
        self.seen: list[tuple[str, str, Any]] = []

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        status = data.monitored_item.Value.StatusCode
        self.seen.append((self.names[node.nodeid], status.name if status is not None else "Good", val))

    def good(self, path: str) -> list[Any]:
        return [value for p, status, value in self.seen if p == path and status == "Good"]

    def first(self, path: str) -> str:
        return next(status for p, status, _ in self.seen if p == path)


def test_seq_0_notifies_for_the_first_bottle_and_again_for_the_first_bottle_of_each_new_run() -> None:
    endpoint, url = free_endpoint(), _free_opcua_url()
    pub = _publisher(endpoint, _welcome("r1"))
    bridge = _bridge(endpoint, url, "--reject-pulse-ms", "0")

    async def scenario() -> None:
        async with _plc(url, bridge) as plc:
            async def read(path: str) -> Any:
                return (await plc.read(path))[path]

            async def welcomed() -> bool:
                return bool(await read("State") == "running")

            await plc.until("the welcome", welcomed)
            # A PLC that reads before any verdict: no value, and a status that says why.
            before = await plc.node("LastVerdict.Seq").read_data_value(raise_on_bad_status=False)
            assert before.StatusCode is not None and before.StatusCode.name == "BadWaitingForInitialData"
            assert before.Value is not None and before.Value.Value is None

            seen = Statuses(plc, "LastVerdict.Seq", "RejectSeq")
            subscription = await plc.client.create_subscription(20, seen)
            await subscription.subscribe_data_change(list(seen.nodes.values()))

            async def notified(runs: int) -> bool:
                return seen.good("LastVerdict.Seq") == [0] * runs and seen.good("RejectSeq") == [0] * runs

            pub.send_multipart(_fail("r1", 0))
            await plc.until("seq 0 of the first run", lambda: notified(1))
            # The station restarted, and the bridge learns it from the new run's seq 0 itself: same value,
            # one event, and still a notification.
            pub.send_multipart(_fail("r2", 0))
            await plc.until("seq 0 of the second run", lambda: notified(2))
            # Restarted again, announced by a heartbeat this time: no value until its first verdict.
            heartbeat = {**_welcome("r3"), "schema": "station.heartbeat/1", "fps": 0.0,
                         "sent_at": "2026-12-02T05:00:00.000Z"}
            pub.send_multipart([b"heartbeat.x", json.dumps(heartbeat).encode()])

            async def third_run() -> bool:
                return bool(await read("RunId") == "r3")

            await plc.until("the third run's heartbeat", third_run)
            assert await read("LastVerdict.Seq") is None  # read as a PLC would, between the runs
            pub.send_multipart(_fail("r3", 0))
            await plc.until("seq 0 of the third run", lambda: notified(3))
            await subscription.delete()
            assert seen.first("LastVerdict.Seq") == seen.first("RejectSeq") == "BadWaitingForInitialData"
            assert await read("RejectCount") == 3

    try:
        # The XPUB attaches the bridge's pipe, and sends it the welcome, when the socket is next used.
        assert pub.poll(30_000), "the bridge never subscribed"
        asyncio.run(scenario())
        _stop(bridge)
    finally:
        bridge.kill()
        pub.close(0)


# -- malformed messages on the port ---------------------------------------------------


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _hello(url: str, *, chunk: bytes = b"F", receive: int = 65535, send: int = 65535, max_message: int = 0,
           size: int | None = None) -> bytes:
    """An OPC UA Hello, built by hand: header, five UInt32 limits, the EndpointUrl as an Int32-length string."""
    endpoint = url.encode()
    body = struct.pack("<5Ii", 0, receive, send, max_message, 0, len(endpoint)) + endpoint
    return b"HEL" + chunk + struct.pack("<I", len(body) + 8 if size is None else size) + body


def _exchange(port: int, data: bytes, wait_s: float = 5) -> tuple[bytes, bool]:
    """What the server answers to ``data``, and whether it then closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return answer, True
            except TimeoutError:
                return answer, False
            if not chunk:
                return answer, True
            answer += chunk


def _messages(answer: bytes) -> list[tuple[bytes, bytes]]:
    """The OPC UA TCP messages in an answer: (type + chunk type, body)."""
    out = []
    while len(answer) >= 8:
        size = struct.unpack_from("<I", answer, 4)[0]
        out.append((answer[:4], answer[8:size]))
        answer = answer[size:]
    return out


def _error(body: bytes) -> tuple[str, str]:
    code, length = struct.unpack_from("<Ii", body)
    return ua.StatusCode(ua.UInt32(code)).name, body[8:8 + length].decode()


def test_malformed_hellos_get_an_error_message_and_a_hang_up_one_short_json_line_each_rate_limited() -> None:
    url = _free_opcua_url()
    port = _port(url)
    bridge = _bridge(free_endpoint(), url)
    opn_garbage = b"OPNF" + struct.pack("<I", 40) + b"\xff" * 32
    cases = {
        "wrong chunk type": (_hello(url, chunk=b"C"), "BadTcpMessageTypeInvalid"),
        "endpoint URL over 4096": (_hello(url + "x" * 5000), "BadTcpEndpointUrlInvalid"),
        "zero buffer sizes": (_hello(url, receive=0, send=0), "BadTcpNotEnoughResources"),
        "message size 0xFFFFFFFF": (_hello(url, size=0xFFFFFFFF), "BadTcpMessageTooLarge"),
        "not OPC UA": (b"GET / HTTP/1.1\r\nHost: plc\r\n\r\n", "BadTcpMessageTypeInvalid"),
    }
    try:
        asyncio.run(_read_something(url, bridge))  # up, and serving
        for case, (data, status) in cases.items():
            answer, closed = _exchange(port, data)
            messages = _messages(answer)
            assert [kind for kind, _ in messages] == [b"ERRF"] and closed, (case, answer[:100], closed)
            assert _error(messages[0][1])[0] == status, (case, _error(messages[0][1]))
        # A good Hello after a bad OpenSecureChannel: acknowledged, then an Error and a hang-up (asyncua
        # logged a traceback for it and kept the connection).
        answer, closed = _exchange(port, _hello(url) + opn_garbage)
        assert [kind for kind, _ in _messages(answer)] == [b"ACKF", b"ERRF"] and closed, answer[:100]
        # MaxMessageSize 0xFFFFFFFF in a Hello is allowed (the client's limit): the server answers with its own.
        answer, closed = _exchange(port, _hello(url, max_message=0xFFFFFFFF), wait_s=1)
        (kind, body), = _messages(answer)
        assert kind == b"ACKF" and not closed
        assert 0 < struct.unpack_from("<5I", body)[3] < 0xFFFFFFFF
        # A scanner at it: many bad clients, few lines.
        bad = list(cases.values())
        for i in range(40):
            assert _exchange(port, bad[i % len(bad)][0])[1]
        asyncio.run(_read_something(url, bridge))  # still serving good clients
        err = _stop(bridge)
    finally:
        bridge.kill()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert all(len(line) < 600 for line in lines), max(lines, key=len)
    events = [json.loads(line) for line in lines]
    refused = [e for e in events if e["event"] == "opcua_bad_message"]
    assert 1 <= len(refused) <= 20 < len(cases) + 41, len(refused)
    first = refused[0]
    assert first["peer"].startswith("127.0.0.1:") and first["status"] == "BadTcpMessageTypeInvalid"
    assert "chunk type 'C'" in first["reason"] and first["data"].startswith(_hello(url, chunk=b"C")[:16].hex())
    assert refused[1]["status"] == "BadTcpEndpointUrlInvalid" and "(5" in refused[1]["data"]  # an excerpt
    others = {e["event"] for e in events} - {"opcua_bad_message"}
    assert others <= {"opcua_bridge_started", "stop_requested", "opcua_bridge_stopped"}, others


async def _read_something(url: str, bridge: subprocess.Popen[str]) -> None:
    async with _plc(url, bridge) as plc:
        assert (await plc.read("WS_Cur_State"))["WS_Cur_State"] == 0


# -- descriptions and engineering units ---------------------------------------------

UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"
#: path: (UnitId from OPC UA's UNECE_to_OPCUA table, DisplayName, type definition)
ANALOGUE = {
    "Fps": (4405559, "s⁻¹", ObjectIds.AnalogUnitType),  # C97, reciprocal second
    "LastVerdict.Confidence": (4404786, "1", ObjectIds.AnalogUnitRangeType),  # C62, one
    "LastVerdict.AnomalyScore": (4404786, "score", ObjectIds.AnalogUnitType),
    "LastVerdict.AnomalyThreshold": (4404786, "score", ObjectIds.AnalogUnitType),
}


async def _tree(node: Node) -> list[Node]:
    children = await node.get_children()
    return [node, *[n for child in children for n in await _tree(child)]]


def test_every_node_says_what_it_means_in_english_and_analogue_values_carry_unece_units() -> None:
    url = _free_opcua_url()
    bridge = _bridge(free_endpoint(), url)

    async def scenario() -> None:
        async with _plc(url, bridge) as plc:
            nodes = await _tree(plc.client.get_node(f"ns={plc.idx};s=Station"))
            assert len(nodes) > 40  # the groups, every point, the units' properties
            undescribed = []
            for node in nodes:
                name, text = (await node.read_browse_name()).Name, await node.read_description()
                # Not the browse name again (asyncua's default), but words, in a language a client can show.
                if text.Locale != "en" or not text.Text or text.Text == name or len(text.Text.split()) < 3:
                    undescribed.append((name, text))
            assert not undescribed, undescribed
            for path, (unit_id, display, typedef) in ANALOGUE.items():
                node = plc.node(path)
                assert await node.read_type_definition() == ua.NodeId(ua.Int32(typedef)), path
                units = await (await node.get_child("0:EngineeringUnits")).read_value()
                assert (units.NamespaceUri, units.UnitId, units.DisplayName.Text) == (UNECE, unit_id, display), units
                assert units.DisplayName.Locale == units.Description.Locale == "en" and units.Description.Text
            confidence_range = await (await plc.node("LastVerdict.Confidence").get_child("0:EURange")).read_value()
            assert (confidence_range.Low, confidence_range.High) == (0.0, 1.0)
            # Counts, codes and text are not analogue: no units.
            plain = ua.NodeId(ua.Int32(ObjectIds.BaseDataVariableType))
            for path in ("WS_Tot_Containers", "WS_Cur_State", "LastVerdict.Seq", "LastVerdict.Verdict"):
                assert await plc.node(path).read_type_definition() == plain, path
                assert await plc.node(path).get_properties() == [], path

    try:
        asyncio.run(scenario())
        _stop(bridge)
    finally:
        bridge.kill()


def test_asyncuas_own_log_records_become_one_line_each_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("asyncua.server.binary_server_asyncio")
    with structlog.testing.capture_logs() as lines, asyncua_logs_as_lines():
        try:
            raise ValueError("unpack requires a buffer of 8 bytes")
        except ValueError:
            logger.exception("Exception raised while processing message from client")
        logger.info("New connection from ('127.0.0.1', 40000)")  # below warning: not worth a line
    assert lines == [{"event": "asyncua_log", "peer": None, "asyncua_level": "error", "log_level": "warning",
                      "message": "Exception raised while processing message from client",
                      "error": "ValueError: unpack requires a buffer of 8 bytes"}]
    assert capsys.readouterr().err == ""  # nothing through logging's last resort, as bare text
