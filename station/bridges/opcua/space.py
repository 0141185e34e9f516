"""The OPC UA bridge's address space: the server, the ``Station`` object and its variables, the reject pulse."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from datetime import datetime, timezone
from typing import Any

from asyncua import ua
from asyncua.common.node import Node
from asyncua.common.ua_utils import value_to_datavalue
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes as S

from station import __version__
from station.bridges.opcua.guard import GuardedServer, listen_url, quiet
from station.bridges.opcua.points import GROUPS, LOCALE, NAMESPACE_URI, NO_VALUE, POINTS, ROOT, UINT32, VTYPES, Point, V
from station.errors import PublishError


def _variant(path: str, value: Any) -> ua.Variant:
    vtype = VTYPES[path]
    if vtype == V.UInt32:
        value = int(value) & UINT32  # counters wrap, as a PLC's UDINT does
    return ua.Variant(value, vtype)


def _data_value(path: str, value: Any) -> ua.DataValue:
    if value is NO_VALUE:
        # A status, not a made-up number: a PLC sees "no value yet", and the first real value is a change
        # for every subscription even when it is 0. Stamped with the time, as every value written.
        return dataclasses.replace(value_to_datavalue(ua.Variant()),
                                   StatusCode=ua.StatusCode(ua.UInt32(S.BadWaitingForInitialData)))
    return value_to_datavalue(_variant(path, value))


class AddressSpace:
    """The OPC UA server and the ``Station`` object; writes only the values that changed."""

    def __init__(self, server: Server, nodes: dict[str, Node], url: str) -> None:
        self.server = server
        self.nodes = nodes
        self.url = url
        self._written: dict[str, Any] = {p.path: p.initial for p in POINTS}

    @classmethod
    async def start(cls, url: str) -> AddressSpace:
        host, port = listen_url(url)
        server = GuardedServer(host, port)
        await server.init()
        server.set_endpoint(url)
        server.set_server_name("station OPC UA bridge")
        # Read-only data for a plant network: no certificates to manage, anonymous reads, writes refused.
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        await server.set_application_uri(f"urn:{socket.gethostname()}:station:bridge:opcua")
        await server.set_build_info(NAMESPACE_URI, "station", "station bridge opcua", __version__, __version__,
                                    datetime.now(timezone.utc))
        idx = await server.register_namespace(NAMESPACE_URI)
        nodes = await _build(server, idx)
        try:
            with quiet("asyncua.server.server"):
                await server.start()
        except OSError as exc:
            raise PublishError(f"--listen {url}: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        return cls(server, nodes, url)

    async def write(self, values: dict[str, Any]) -> None:
        for path, value in values.items():
            if self._written.get(path) != value:
                await self.nodes[path].write_value(_data_value(path, value))
                self._written[path] = value

    async def stop(self) -> None:
        await self.server.stop()


def _nodeid(text: str, idx: int) -> ua.NodeId:
    return ua.NodeId(ua.String(text), ua.Int16(idx))


def _ns0(identifier: int) -> ua.NodeId:
    return ua.NodeId(ua.Int32(identifier))


def _text(text: str) -> ua.LocalizedText:
    return ua.LocalizedText(text, LOCALE)


async def _add_variable(parent: Node, nodeid: ua.NodeId, name: ua.QualifiedName, description: str,
                        value: ua.Variant, datatype: int, typedef: int = ObjectIds.BaseDataVariableType,
                        reference: int = ObjectIds.HasComponent) -> Node:
    """A read-only scalar variable of ``typedef``.

    Node.add_variable can neither give a type definition nor a Description other than the browse name.
    """
    attrs = ua.VariableAttributes(DisplayName=ua.LocalizedText(name.Name), Description=_text(description),
                                  Value=value, DataType=_ns0(datatype), ValueRank=ua.ValueRank.Scalar,
                                  AccessLevel=ua.AccessLevel.CurrentRead.mask,
                                  UserAccessLevel=ua.AccessLevel.CurrentRead.mask)
    item = ua.AddNodesItem(ParentNodeId=parent.nodeid, ReferenceTypeId=_ns0(reference),
                           RequestedNewNodeId=nodeid, BrowseName=name, NodeClass=ua.NodeClass.Variable,
                           NodeAttributes=attrs, TypeDefinition=_ns0(typedef))
    (result,) = await parent.session.add_nodes([item])
    result.StatusCode.check()
    return Node(parent.session, result.AddedNodeId)


async def _add_property(parent: Node, node_id: str, idx: int, name: str, description: str, value: Any,
                        datatype: int) -> None:
    # The standard's property names (EngineeringUnits, EURange) are in namespace 0; their NodeIds are ours.
    await _add_variable(parent, _nodeid(f"{node_id}.{name}", idx), ua.QualifiedName(name, 0), description,
                        ua.Variant(value, V.ExtensionObject), datatype, ObjectIds.PropertyType, ObjectIds.HasProperty)


async def _add_point(parent: Node, point: Point, idx: int) -> Node:
    node_id, name = f"{ROOT}.{point.path}", point.path.rsplit(".", 1)[-1]
    typedef = ObjectIds.BaseDataVariableType
    if point.unit is not None:
        # AnalogUnitType: EngineeringUnits mandatory, EURange optional. Not AnalogItemType, which makes an
        # EURange mandatory that a score or a rate does not have; with a range, AnalogUnitRangeType is one.
        typedef = ObjectIds.AnalogUnitType if point.eu_range is None else ObjectIds.AnalogUnitRangeType
    # A point without a value yet is created with a placeholder of its type, then given its status below.
    placeholder = _variant(point.path, 0 if point.initial is NO_VALUE else point.initial)
    node = await _add_variable(parent, _nodeid(node_id, idx), ua.QualifiedName(name, idx), point.description,
                               placeholder, getattr(ObjectIds, point.vtype.name), typedef)
    if point.unit is not None:
        await _add_property(node, node_id, idx, "EngineeringUnits", f"the unit of {name}: {point.unit.description}",
                            point.unit.information(), ObjectIds.EUInformation)
    if point.eu_range is not None:
        low, high = point.eu_range
        await _add_property(node, node_id, idx, "EURange", f"the range of {name} in normal operation: "
                            f"{low:g} to {high:g}", ua.Range(Low=low, High=high), ObjectIds.Range)
    await node.write_value(_data_value(point.path, point.initial))
    return node


async def _build(server: Server, idx: int) -> dict[str, Node]:
    """The ``Station`` object, one child object per group (LastVerdict, Counters, Stream), a variable per point."""
    parents: dict[str, Node] = {}

    async def parent(path: str) -> Node:
        if path not in parents:
            above = server.nodes.objects if path == ROOT else await parent(path.rsplit(".", 1)[0])
            name = path.rsplit(".", 1)[-1]
            node = await above.add_object(_nodeid(path, idx), ua.QualifiedName(name, idx))
            await node.write_attribute(AttributeIds.Description,
                                       ua.DataValue(ua.Variant(_text(GROUPS[name]), V.LocalizedText)))
            parents[path] = node
        return parents[path]

    nodes: dict[str, Node] = {}
    for point in POINTS:
        nodes[point.path] = await _add_point(await parent(".".join([ROOT, *point.path.split(".")[:-1]])), point, idx)
    return nodes


class RejectPulse:
    """RejectPulse high for ``width_s`` after the latest fail: a fail while it is high extends it.

    The pulse is for a PLC that edge-detects; RejectCount is what loses nothing.
    """

    def __init__(self, space: AddressSpace, width_s: float) -> None:
        self.space = space
        self.width_s = width_s
        self._lower: asyncio.Task[None] | None = None

    async def fire(self) -> None:
        if self.width_s <= 0:
            return  # --reject-pulse-ms 0: no pulse, RejectCount only
        if self._lower is not None:
            self._lower.cancel()
        await self.space.write({"RejectPulse": True})
        self._lower = asyncio.create_task(self._lower_later())

    async def _lower_later(self) -> None:
        await asyncio.sleep(self.width_s)
        await self.space.write({"RejectPulse": False})

    async def close(self) -> None:
        if self._lower is not None:
            self._lower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lower
