"""The wire contract as code: the models publish the bytes the hand-built dicts did, the schema files are
generated from the models, one counter step and one online rule for every reader of the stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from station.contract import schema
from station.contract.counters import Counters
from station.contract.liveness import Liveness, online_window
from station.contract.messages import HeartbeatMessage, VerdictMessage, WelcomeMessage, encode
from station.contract.timefmt import iso_utc
from station.core.anomaly import Region
from station.core.decide import Decision
from station.core.frame import Frame, Trigger
from station.core.verdict import Verdict, error_verdict, skipped_verdict

SCHEMAS = Path(__file__).parents[1] / "station/schemas"


def _legacy_message(v: Verdict, station: str, run_id: str, seq: int, published_at: float) -> dict[str, Any]:
    """The verdict dict as station/core/verdict.py built it by hand before the models (commit a918f51)."""
    d = v.decision
    trigger = v.frame.trigger
    msg: dict[str, Any] = {
        "schema": "station.verdict/1", "station": station, "run_id": run_id, "seq": seq,
        "frame_id": v.frame.frame_id, "source": v.frame.source, "captured_at": iso_utc(v.frame.captured_at),
        "trigger": None if trigger is None else {k: getattr(trigger, k) for k in
                                                 ("block_id", "count", "encoder", "camera_timestamp")},
        "published_at": iso_utc(published_at), "verdict": v.verdict, "reasons": list(v.reasons),
        "class": None, "anomaly": None, "error": v.error,
        "latency_ms": {k: round(x, 3) for k, x in v.latency_ms.items()}, "model": v.model, "truth": v.frame.label,
    }
    if d is not None:
        msg["class"] = {"label": d.label, "confidence": round(d.confidence, 6),
                        "scores": {k: round(x, 6) for k, x in d.scores.items()}}
        msg["anomaly"] = {"score": round(d.anomaly_score, 6), "threshold": v.threshold,
                          "region": {"bbox": list(d.region.bbox) if d.region.bbox else None,
                                     "area_px": d.region.area_px, "area_fraction": round(d.region.area_fraction, 6)}}
    return msg


def _legacy_bytes(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _frame(label: str | None = "contamination", trigger: Trigger | None = None) -> Frame:
    return Frame(seq=3, frame_id="Flaschen/Ölfleck 003.png", source="folder:/data/линия", captured_at=1764650000.1234,
                 captured_mono=5.0, label=label, trigger=trigger)


def _samples() -> list[Verdict]:
    decision = Decision("fail", ["defect_class", "anomaly"], "contamination", 0.8123456789,
                        {"good": 0.1, "contamination": 0.8123456789, "broken": 0.0876543211}, 0.07312345678,
                        Region((101, 120, 40, 30), 917, 0.00113209876))
    passed = Decision("pass", [], "good", 1.0, {"good": 1.0, "contamination": 0, "broken": 0}, 0, Region(None, 0, 0.0))
    model = {"name": "bottles", "version": "2026.12.1"}
    latency = {"read": 1.23456, "inspect": 30.0, "total": 35}
    return [
        Verdict(_frame(trigger=Trigger(block_id=2**40, count=7)), "fail", ["defect_class", "anomaly"], model,
                decision, 0.05, latency_ms=latency),
        # An integer threshold (a hand-set config value) stays an integer on the wire.
        Verdict(_frame(None), "pass", [], model, passed, 5, latency_ms={"total": 0.0004}),
        error_verdict(_frame(), "unreadable_image", "cannot decode «PNG»", model),
        skipped_verdict(_frame(trigger=Trigger()), model, "camera_skipped"),
    ]


@pytest.mark.parametrize("index", range(4))
def test_published_bytes_are_those_of_the_hand_built_message(index: int) -> None:
    verdict = _samples()[index]
    legacy = _legacy_message(verdict, "linie-1", "r-ä", 41, 1764650000.5)
    message = verdict.to_message("linie-1", "r-ä", 41, 1764650000.5)
    assert encode(message) == _legacy_bytes(legacy)
    assert list(message) == list(legacy)
    # What a bridge parses is what was published: the round trip through the model changes no byte.
    parsed = VerdictMessage.model_validate_json(encode(message))
    assert encode(parsed.model_dump(mode="json", by_alias=True)) == _legacy_bytes(legacy)


def test_a_verdict_outside_the_contract_is_refused_before_it_is_published() -> None:
    verdict = _samples()[0]
    verdict.reasons = ["a reason no bridge knows"]
    with pytest.raises(ValidationError):
        verdict.to_message("s", "r", 0, 0.0)


def test_the_schema_files_are_those_the_models_generate(tmp_path: Path) -> None:
    assert schema.stale() == [], "run: python -m station.contract.schema --write"
    assert schema.main(["--dir", str(tmp_path)]) == 1  # nothing there yet: all differ
    assert schema.main(["--write", "--dir", str(tmp_path)]) == 0
    assert schema.main(["--dir", str(tmp_path)]) == 0
    (tmp_path / "verdict-1.schema.json").write_text("{}")
    assert schema.stale(tmp_path) == [tmp_path / "verdict-1.schema.json"]


def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    return loaded


def test_the_generated_schemas_are_as_strict_as_the_hand_kept_ones() -> None:
    verdict = _schema("verdict-1.schema.json")
    good = _samples()[0].to_message("s", "r", 0, 0.0)
    jsonschema.validate(good, verdict)
    for broken in ({**good, "extra": 1}, {k: v for k, v in good.items() if k != "truth"},
                   {**good, "verdict": "maybe"}, {**good, "reasons": []}, {**good, "captured_at": "yesterday"},
                   {**good, "class": {**good["class"], "confidence": 1.5}}, {**good, "seq": -1},
                   {**good, "verdict": "pass", "reasons": ["anomaly"]},
                   {**good, "verdict": "pass", "reasons": [], "class": None},
                   {**good, "anomaly": {**good["anomaly"], "region": {**good["anomaly"]["region"], "bbox": [1, 2]}}},
                   {**good, "model": {"name": "x"}}, {**good, "trigger": {"block_id": 1, "frame": 2}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, verdict)
    counters = Counters(captured=2, published=2, passed=2).snapshot()
    beat = {"schema": "station.heartbeat/1", "station": "s", "run_id": "r", "state": "running",
            "sent_at": iso_utc(0), "next_seq": 2, "counters": counters, "fps": 1.5, "drift": None}
    heartbeat = _schema("heartbeat-1.schema.json")
    jsonschema.validate(beat, heartbeat)
    jsonschema.validate({**beat, "camera": {"state": "connected"}}, heartbeat)
    worst = {"quantity": "brightness", "value": 0.6, "bound": 0.5, "direction": "above", "since": iso_utc(0)}
    jsonschema.validate({**beat, "drift": {**worst, "quantities": [worst]}}, heartbeat)
    for broken in ({**beat, "state": "dozing"}, {k: v for k, v in beat.items() if k != "drift"},
                   {**beat, "counters": {**counters, "failed": -1}},
                   {**beat, "counters": {k: v for k, v in counters.items() if k != "errors"}},
                   {**beat, "drift": {**worst, "quantities": []}}, {**beat, "drift": {"state": "ok"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, heartbeat)
    welcome = {"schema": "station.welcome/1", "station": "s", "run_id": "r", "next_seq": 1, "state": "running",
               "counters": counters, "last_verdict": good}
    jsonschema.validate(welcome, _schema("welcome-1.schema.json"))
    jsonschema.validate({**welcome, "last_verdict": None}, _schema("welcome-1.schema.json"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**welcome, "last_verdict": {**good, "seq": "x"}}, _schema("welcome-1.schema.json"))


def test_heartbeat_and_welcome_models_read_what_the_station_sends() -> None:
    counters = Counters(captured=3, inspected=3, published=3, passed=2, failed=1)
    beat = HeartbeatMessage.model_validate({"station": "s", "run_id": "r", "state": "degraded", "sent_at": iso_utc(0),
                                            "next_seq": 3, "counters": counters.snapshot(), "fps": 2,
                                            "drift": {"state": "ok", "z": 0.5}})
    # A later station's other drift shape is kept as sent; camera is left out when there is none.
    assert beat.wire()["drift"] == {"state": "ok", "z": 0.5} and "camera" not in beat.wire()
    assert beat.counters == counters and list(beat.wire())[:3] == ["schema", "station", "run_id"]
    welcome = WelcomeMessage.model_validate({"schema": "station.welcome/1", "station": "s", "run_id": "r",
                                             "next_seq": 0, "state": "starting", "counters": {**Counters().snapshot()},
                                             "last_verdict": None})
    assert welcome.last_verdict is None and welcome.counters == Counters()


def test_one_counter_step_per_verdict_as_the_station_counts() -> None:
    c = Counters(captured=10, published=4)
    for verdict, error in (("pass", False), ("fail", False), ("fail", True), ("skipped", False)):
        c.count(verdict, error)
    assert c == Counters(captured=10, inspected=2, skipped=1, errors=1, published=8, passed=1, failed=2)
    # A reader that saw no capture keeps captured at least published, as the station's always is.
    seen = Counters()
    seen.count("pass", False)
    assert (seen.captured, seen.published, seen.inspected) == (1, 1, 1)


def test_the_station_is_online_until_three_heartbeat_intervals_of_silence() -> None:
    assert online_window(3.0, 0.5) == 3.0 and online_window(3.0, 10.0) == 30.0
    live = Liveness(floor_s=3.0)
    assert not live.online(0.0)  # never heard from
    live.heard(100.0, heartbeat=True)
    live.heard(110.0, heartbeat=True)  # a station beating every 10 s
    assert live.online(139.9) and not live.online(140.0)
    live.heard(141.0, heartbeat=False)  # any message shows it alive
    assert live.online(170.0) and live.silent_s(170.0) == 29.0
    smooth = Liveness(floor_s=3.0, heartbeat_interval_s=1.0, smoothing=0.2)
    smooth.heard(0.0, True)
    smooth.heard(6.0, True)  # one late heartbeat moves the window a fifth of the way
    assert smooth.window_s == pytest.approx(6.0)
