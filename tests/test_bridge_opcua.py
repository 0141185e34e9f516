"""The OPC UA bridge as a PLC meets it: a real `station bridge opcua` process, read with asyncua's Client."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from asyncua import Client, Node
from asyncua.common.subscription import DataChangeNotif

from station.bridges.feed import FeedEvent
from station.bridges.opcua import NAMESPACE_URI, StationView
from station.publish import SequenceTracker
from tests.conftest import free_endpoint, run_station, start_bridge, stop_bridge
from tests.stationproc import StationProcess
from tests.test_verdict_stream import _drop

Message = dict[str, Any]


def _free_opcua_url() -> str:
    return f"opc.tcp://127.0.0.1:{free_endpoint().rsplit(':', 1)[1]}/station/"


def _bridge(endpoint: str, url: str, *extra: str) -> subprocess.Popen[str]:
    return start_bridge("opcua", endpoint, "--listen", url, *extra)


def _stop(bridge: subprocess.Popen[str]) -> None:
    stop_bridge(bridge, "opcua_bridge_stopped")


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


def _status(kind: Literal["welcome", "heartbeat"], run_id: str, next_seq: int, published: int,
            failed: int = 0) -> FeedEvent:
    counters = {"captured": published, "published": published, "inspected": published, "passed": published - failed,
                "failed": failed, "skipped": 0, "errors": 0}
    return FeedEvent(kind, {"run_id": run_id, "next_seq": next_seq, "state": "running",
                            "counters": counters, "station": "s"})


def _verdict(run_id: str, seq: int, verdict: str) -> FeedEvent:
    return FeedEvent("verdict", {"run_id": run_id, "seq": seq, "verdict": verdict, "reasons": [], "error": None})


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
