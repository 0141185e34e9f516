"""Sparkplug B payloads: the Eclipse Tahu ``Payload`` message, defined in code with ``protobuf``.

No PyPI package that carries the Sparkplug B protobuf is both maintained and
small (tahu 0.1.2 is from 2022, pysparkplug is one person's and pulls its own
MQTT layer), so the message is declared here from the specification's
``sparkplug_b.proto`` (package ``org.eclipse.tahu.protobuf``, proto2) with the
same field numbers and types; protobuf builds the class at import, no protoc.
Only what a node sends is declared (``Payload``: timestamp, metrics, seq;
``Metric``: name, alias, timestamp, datatype, is_null and the scalar value
fields 10…16). Fields left out (metadata, properties, datasets, templates)
are never written, and a decoder that knows them reads these payloads
unchanged, as protobuf skips nothing it was not sent.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

# Sparkplug B DataType codes (spec §6.4.16)
INT32, INT64, UINT32, UINT64, FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME = 3, 4, 7, 8, 9, 10, 11, 12, 13

_F = descriptor_pb2.FieldDescriptorProto
#: Metric's value oneof: field number, proto type, Python attribute
_VALUE_FIELDS = ((10, _F.TYPE_UINT32, "int_value"), (11, _F.TYPE_UINT64, "long_value"),
                 (12, _F.TYPE_FLOAT, "float_value"), (13, _F.TYPE_DOUBLE, "double_value"),
                 (14, _F.TYPE_BOOL, "boolean_value"), (15, _F.TYPE_STRING, "string_value"),
                 (16, _F.TYPE_BYTES, "bytes_value"))


def _build() -> Any:
    fd = descriptor_pb2.FileDescriptorProto(name="station_sparkplug_b.proto", package="org.eclipse.tahu.protobuf",
                                            syntax="proto2")
    payload = fd.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    opt = _F.LABEL_OPTIONAL
    for name, number, ftype in (("name", 1, _F.TYPE_STRING), ("alias", 2, _F.TYPE_UINT64),
                                ("timestamp", 3, _F.TYPE_UINT64), ("datatype", 4, _F.TYPE_UINT32),
                                ("is_historical", 5, _F.TYPE_BOOL), ("is_transient", 6, _F.TYPE_BOOL),
                                ("is_null", 7, _F.TYPE_BOOL)):
        metric.field.add(name=name, number=number, type=ftype, label=opt)
    for number, ftype, name in _VALUE_FIELDS:
        metric.field.add(name=name, number=number, type=ftype, label=opt, oneof_index=0)
    payload.field.add(name="timestamp", number=1, type=_F.TYPE_UINT64, label=opt)
    payload.field.add(name="metrics", number=2, type=_F.TYPE_MESSAGE, label=_F.LABEL_REPEATED,
                      type_name=".org.eclipse.tahu.protobuf.Payload.Metric")
    payload.field.add(name="seq", number=3, type=_F.TYPE_UINT64, label=opt)
    payload.field.add(name="uuid", number=4, type=_F.TYPE_STRING, label=opt)
    payload.field.add(name="body", number=5, type=_F.TYPE_BYTES, label=opt)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))


#: the Sparkplug B Payload message class (``Payload()``, ``.FromString(bytes)``)
Payload: Any = _build()

_ATTR = {INT32: "int_value", UINT32: "int_value", INT64: "long_value", UINT64: "long_value",
         DATETIME: "long_value", FLOAT: "float_value", DOUBLE: "double_value", BOOLEAN: "boolean_value",
         STRING: "string_value"}


def payload(timestamp_ms: int, metrics: list[tuple[str, int, Any]], seq: int | None) -> bytes:
    """Encode a Payload: ``metrics`` as (name, datatype, value); a None value is sent as is_null."""
    p = Payload(timestamp=timestamp_ms)
    if seq is not None:
        p.seq = seq
    for name, datatype, value in metrics:
        m = p.metrics.add(name=name, datatype=datatype, timestamp=timestamp_ms)
        if value is None:
            m.is_null = True
        else:
            setattr(m, _ATTR[datatype], value)
    return bytes(p.SerializeToString())


def decode(data: bytes) -> dict[str, Any]:
    """A payload as {"seq", "timestamp", "metrics": {name: value}} (for tests and troubleshooting)."""
    p = Payload.FromString(data)
    metrics: dict[str, Any] = {}
    for m in p.metrics:
        which = m.WhichOneof("value")
        metrics[m.name] = None if m.is_null or which is None else getattr(m, which)
    return {"seq": p.seq if p.HasField("seq") else None, "timestamp": p.timestamp, "metrics": metrics}
