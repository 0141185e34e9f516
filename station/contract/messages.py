"""The messages on the verdict socket as pydantic models: ``station.verdict/1``, ``station.heartbeat/1``,
``station.welcome/1``.

The station builds what it publishes through these models and the bridges parse what they receive with
them; ``station/schemas/*.schema.json`` are generated from them (``python -m station.contract.schema
--write``). Field order is the order on the wire.

Published bytes are ``json.dumps(model.model_dump(mode="json", by_alias=True), separators=(",", ":"),
ensure_ascii=False)`` (``encode``), not pydantic's own JSON: that writes floats differently from json.dumps,
and the bytes must stay what bridges and recorded streams already hold. Numbers keep their Python type
(``int | float``): a float field would turn a threshold of 5 into ``5.0`` on the wire.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from station.contract.counters import Counters

VERDICT_SCHEMA: Final = "station.verdict/1"
HEARTBEAT_SCHEMA: Final = "station.heartbeat/1"
WELCOME_SCHEMA: Final = "station.welcome/1"

VerdictValue = Literal["pass", "fail", "skipped"]
#: every reason code a verdict may carry (station/core/decide.py, station/core/pipeline.py, station/sources)
Reason = Literal["defect_class", "anomaly", "error", "overload", "unreadable_image", "unsupported_image",
                 "image_too_small", "no_bottle_found", "inference_error", "camera_skipped", "grab_failed",
                 "shutdown"]
State = Literal["starting", "running", "degraded", "stopping", "stopped"]
DriftQuantityName = Literal["mouth_offset", "mouth_radius", "brightness", "contrast", "anomaly_score",
                            "good_confidence"]

TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"
#: UTC with milliseconds (station/contract/timefmt.py): fixed width, so text order is time order
Timestamp = Annotated[str, Field(pattern=TIMESTAMP_PATTERN)]


# A JSON number that keeps its Python type, with the schema's bounds.
Number = Annotated[int | float, WithJsonSchema({"type": "number"})]
NonNegative = Annotated[int | float, Field(ge=0), WithJsonSchema({"type": "number", "minimum": 0})]
Probability = Annotated[int | float, Field(ge=0, le=1),
                        WithJsonSchema({"type": "number", "minimum": 0, "maximum": 1})]


#: the schemas describe what is published: a field with a default is always written, so it is required
_WIRE = ConfigDict(populate_by_name=True, json_schema_serialization_defaults_required=True)


class _Strict(BaseModel):
    model_config = ConfigDict(**_WIRE, extra="forbid")


class Trigger(_Strict):
    """What the source knows of the trigger that took this frame, for the PLC's shift register."""

    block_id: int | None = Field(description="the camera's frame counter (GigE Vision/USB3 Vision block id)")
    count: int | None = Field(description="trigger counter, where the source delivers one")
    encoder: int | None = Field(description="conveyor encoder count at the trigger, where the source delivers one")
    camera_timestamp: int | None = Field(
        description="the camera's tick counter at exposure (ns on most GenICam cameras)")


class ClassResult(_Strict):
    label: str
    confidence: Probability
    #: the bundle's classes in the bundle's order (the Modbus map's class index is this order)
    scores: dict[str, Probability]


class Region(_Strict):
    bbox: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=4, max_length=4)] | None = Field(
        description="x, y, width, height in canonical 900×900 view pixels")
    area_px: Annotated[int, Field(ge=0)]
    area_fraction: Probability


class AnomalyResult(_Strict):
    score: Number
    threshold: Number
    region: Region


class ErrorInfo(_Strict):
    reason: str
    detail: str


ModelId = Annotated[dict[str, str], WithJsonSchema({
    "type": "object", "required": ["name", "version"],
    "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
    "additionalProperties": {"type": "string"}})]

# The schema's conditions the field types cannot say: a pass has no reasons and was classified; a fail has one.
_VERDICT_RULES: dict[str, Any] = {"allOf": [
    {"if": {"properties": {"verdict": {"const": "pass"}}},
     "then": {"properties": {"reasons": {"maxItems": 0}, "class": {"type": "object"}}}},
    {"if": {"properties": {"verdict": {"const": "fail"}}},
     "then": {"properties": {"reasons": {"minItems": 1}}}},
]}


class VerdictMessage(_Strict):
    """One per captured frame: ``[verdict.<station>, payload]``."""

    model_config = ConfigDict(**_WIRE, title="station verdict message", json_schema_extra=_VERDICT_RULES,
                              extra="forbid")

    schema_: Literal["station.verdict/1"] = Field(VERDICT_SCHEMA, alias="schema")
    station: Annotated[str, Field(min_length=1)]
    run_id: Annotated[str, Field(min_length=1, description="New at every start of the station.")]
    seq: Annotated[int, Field(ge=0, description="Consecutive per run_id; a gap means lost verdicts.")]
    frame_id: str
    source: str
    captured_at: Timestamp
    trigger: Trigger | None = Field(None, description="what the source knows of the trigger that took this "
                                                      "frame, for the PLC's shift register; null for replayed files")
    published_at: Timestamp
    verdict: VerdictValue
    reasons: list[Reason]
    class_: ClassResult | None = Field(alias="class")
    anomaly: AnomalyResult | None
    error: ErrorInfo | None
    latency_ms: dict[str, NonNegative]
    model: ModelId
    truth: str | None = Field(description="Ground-truth label when replaying a labelled folder.")


class Drifting(BaseModel):
    model_config = _WIRE

    quantity: DriftQuantityName
    value: Number
    bound: Number
    direction: Literal["above", "below"]
    since: str


class DriftReport(Drifting):
    """The worst drifting quantity, and all of them, worst first."""

    quantities: Annotated[list[Drifting], Field(min_length=1)]


def _camera_optional(schema: dict[str, Any]) -> None:
    # Written only by a station with a camera source: the one field a heartbeat may leave out.
    schema["required"].remove("camera")


class HeartbeatMessage(BaseModel):
    """Every heartbeat_interval_s, and a last one with state stopped: ``[heartbeat.<station>, payload]``."""

    model_config = ConfigDict(**_WIRE, title="station heartbeat message", extra="allow",
                              json_schema_extra=_camera_optional)

    schema_: Literal["station.heartbeat/1"] = Field(HEARTBEAT_SCHEMA, alias="schema")
    station: str
    run_id: str
    state: State
    sent_at: str
    next_seq: Annotated[int, Field(ge=0)]
    counters: Counters
    fps: NonNegative
    # A later station's other drift shape is still taken (and shown as is by the UI); the schema says
    # what this one sends.
    drift: DriftReport | SkipJsonSchema[dict[str, Any]] | None = Field(
        None, description="null while nothing drifts (or drift watch is off); else the worst drifting "
                          "quantity and all of them")
    #: the camera's health; absent (not null) for a source without one
    camera: dict[str, Any] | SkipJsonSchema[None] = None

    def wire(self) -> dict[str, Any]:
        message = self.model_dump(mode="json", by_alias=True)
        if message.get("camera") is None:
            message.pop("camera", None)
        return message


class WelcomeMessage(BaseModel):
    """What a (re)connecting subscriber gets first, one frame: ``welcome.<station> {json}``."""

    model_config = ConfigDict(**_WIRE, title="station welcome message", extra="allow")

    schema_: Literal["station.welcome/1"] = Field(WELCOME_SCHEMA, alias="schema")
    station: str
    run_id: str
    next_seq: Annotated[int, Field(ge=0)]
    state: State
    counters: Counters
    last_verdict: VerdictMessage | None


StationMessage = VerdictMessage | HeartbeatMessage | WelcomeMessage


def encode(message: dict[str, Any]) -> bytes:
    """The published bytes of a message dict (a model's ``model_dump(mode="json", by_alias=True)``)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_model(model: VerdictMessage | HeartbeatMessage) -> bytes:
    message = model.wire() if isinstance(model, HeartbeatMessage) else model.model_dump(mode="json", by_alias=True)
    return encode(message)
