"""The Modbus bridge's server: pymodbus's datastore fed from the state, and the bridge's own TCP framing.

pymodbus 3.16's request handler answers only the first of several requests in one TCP segment, drops a
receive buffer over 264 bytes, answers a malformed request with exception 01 under function code 0x80,
and logs hex dumps of what a client sent. The bridge splits the stream into MBAP frames, checks each
request as the Modbus spec says, answers every one in order, and leaves pymodbus the PDU classes and the
datastore. A misbehaving client gets one short, rate-limited JSON log line (station/bridges/badclients.py).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from typing import Any, cast

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.transport import CommParams, CommType, ModbusProtocol

from station.bridges.badclients import BadClientLog, excerpt
from station.bridges.modbus.registers import (
    ACK_COIL,
    FC_COILS,
    FC_DISCRETE,
    FC_REGISTERS,
    FC_SERVED,
    STATUS_BITS,
    U16,
    Addr,
)
from station.bridges.modbus.state import BridgeState

log = structlog.get_logger("station.bridge.modbus")


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RegisterFace:
    """pymodbus's per-request hook: renders the state into the block being read, and takes the PLC's writes.

    pymodbus calls it before it reads or writes the block, with the block's whole
    register list to modify in place; a write's values are applied after it returns.
    """

    def __init__(self, state: BridgeState) -> None:
        self.state = state

    async def action(self, function_code: int, _start_address: int, address: int, _count: int,
                     registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        if function_code in FC_COILS and values is not None:
            return self._coils_written(address, values)
        if function_code in FC_COILS | FC_DISCRETE:
            # Bit blocks are packed 16 to a register, bit 0 first, and start at address 0:
            # register 0 holds coils/discrete inputs 0-15, so bit N is status bit N.
            registers[0] = self.state.status_word()
            return None
        if function_code in FC_REGISTERS:
            if values is not None:
                self._registers_written(address, values)
            registers[: Addr.SIZE] = self.state.registers()
        return None

    def _coils_written(self, address: int, values: list[int] | list[bool]) -> ExcCodes | None:
        written = range(address, address + len(values))
        if any(coil != ACK_COIL for coil in written):
            return ExcCodes.ILLEGAL_ADDRESS
        self.state.write_ack_coil(bool(values[ACK_COIL - address]))
        return None

    def _registers_written(self, address: int, values: list[int] | list[bool]) -> None:
        # Every other holding register is read-only (pymodbus refuses the write before calling us).
        if address <= Addr.CONTROL < address + len(values):
            self.state.write_control(int(values[Addr.CONTROL - address]))


async def _unknown_unit(*_args: Any) -> ExcCodes:
    # What a Modbus TCP gateway answers for a unit behind it that does not respond; tells a
    # commissioning engineer the unit id is wrong, where an illegal-address error would mislead.
    return ExcCodes.GATEWAY_NO_RESPONSE


def build_devices(unit: int, face: RegisterFace) -> list[SimDevice]:
    bits = DataType.BITS
    regs = DataType.REGISTERS
    # Bits as a list, not count=: pymodbus 3.16 applies a bit block's count twice in its overlap
    # check, so count=7 at 0 "overlaps" a block at 16.
    status = [False] * STATUS_BITS
    device = SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=status, datatype=bits), SimData(ACK_COIL, values=[False], datatype=bits)],
            [SimData(0, values=status, datatype=bits)],
            [SimData(0, count=Addr.CONTROL, values=0, datatype=regs, readonly=True),
             SimData(Addr.CONTROL, values=0, datatype=regs)],
            [SimData(0, count=Addr.SIZE, values=0, datatype=regs, readonly=True)],
        ),
        action=face.action,
    )
    if unit == 0:  # pymodbus's device 0 answers every unit id
        return [device]
    # Without a device 0, pymodbus answers another unit id with a traceback in the log and exception 04.
    catch_all = SimDevice(id=0, simdata=[SimData(0, count=U16 + 1, datatype=regs)], action=_unknown_unit)
    return [device, catch_all]


# -- Modbus TCP framing and request checks ---------------------------------------

#: the MBAP header: transaction id, protocol id (0 for Modbus), length (unit id + PDU), unit id
MBAP = struct.Struct(">HHHB")
#: the largest PDU (Modbus Application Protocol V1.1b3, 4.1): an MBAP length is 2 (unit, function) to 254
MAX_PDU = 253
#: requests one connection may have waiting before the bridge stops reading from it until it has caught up
PIPELINE_LIMIT = 64
#: the spec's quantity limits (V1.1b3, 6.1-6.4, 6.11, 6.12, 6.17)
READ_BITS_MAX, READ_REGS_MAX = 2000, 125
WRITE_BITS_MAX, WRITE_REGS_MAX, READ_WRITE_REGS_MAX = 1968, 123, 121
#: the only two values a write single coil (FC05) may carry
COIL_ON, COIL_OFF = 0xFF00, 0x0000


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at: at + 2], "big")


def _write_ok(data: bytes, count_at: int, quantity: int, limit: int, nbytes: int) -> bool:
    # The byte count must agree with the quantity, and the data that follows with the byte count.
    return 1 <= quantity <= limit and data[count_at] == nbytes and len(data) == count_at + 1 + nbytes


def check_request(pdu: bytes) -> ExcCodes | None:
    """The exception the Modbus spec gives a request before it reaches the map; None when it passes.

    Function code first (01), then quantity, value, byte count and length (03), in the order of the spec's
    state diagrams. pymodbus 3.16 answers a bad quantity with 01 and takes any FC05 value but 0 for ON.
    """
    fc, data = pdu[0], pdu[1:]
    if fc not in FC_SERVED:
        return ExcCodes.ILLEGAL_FUNCTION
    if fc == 8 and len(data) >= 2 and _u16(data, 0) not in DecodePDU.pdu_sub_table.get(fc, {}):
        return ExcCodes.ILLEGAL_FUNCTION  # a diagnostics sub-function pymodbus does not know: it would fail (04)
    if fc in (1, 2, 3, 4):
        ok = len(data) == 4 and 1 <= _u16(data, 2) <= (READ_BITS_MAX if fc in (1, 2) else READ_REGS_MAX)
    elif fc == 5:
        ok = len(data) == 4 and _u16(data, 2) in (COIL_ON, COIL_OFF)
    elif fc in (6, 22):
        ok = len(data) == (4 if fc == 6 else 6)
    elif fc in (15, 16):
        quantity = _u16(data, 2)
        nbytes, limit = ((quantity + 7) // 8, WRITE_BITS_MAX) if fc == 15 else (2 * quantity, WRITE_REGS_MAX)
        ok = len(data) >= 5 and _write_ok(data, 4, quantity, limit, nbytes)
    elif fc == 23:
        quantity = _u16(data, 6)
        ok = (len(data) >= 9 and 1 <= _u16(data, 2) <= READ_REGS_MAX
              and _write_ok(data, 8, quantity, READ_WRITE_REGS_MAX, 2 * quantity))
    else:
        ok = True  # diagnostics and identification: pymodbus's decoder checks them
    return None if ok else ExcCodes.ILLEGAL_VALUE


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return address(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None


class BridgeServer(ModbusTcpServer):
    """pymodbus's TCP listener and datastore, with the bridge's Connection in place of pymodbus's handler."""

    def __init__(self, devices: list[SimDevice], address: tuple[str, int], state: BridgeState) -> None:
        super().__init__(devices, address=address)
        self.state = state
        self.bad_clients = BadClientLog(log)
        self.failures = BadClientLog(log)

    def callback_new_connection(self) -> ModbusProtocol:
        return Connection(self)

    async def respond(self, tid: int, unit: int, pdu: bytes, peer: str | None) -> bytes:
        """The response frame to one request frame's PDU."""
        try:
            response = await self._response(unit, pdu, peer)
            body = bytes([response.function_code]) + response.encode()
        except Exception as exc:  # a fault in one request must cost that request, not the connection
            self.failures.report("modbus_request_failed", peer, unit=unit, function_code=pdu[0], error=exc)
            body = bytes([pdu[0] | 0x80, ExcCodes.DEVICE_FAILURE])
        return MBAP.pack(tid, 0, len(body) + 1, unit) + body

    async def _response(self, unit: int, pdu: bytes, peer: str | None) -> ModbusPDU:
        problem = check_request(pdu)
        request = None if problem else self.decoder.decode(pdu)
        if problem or request is None:
            # A function code we serve whose data pymodbus cannot decode is malformed data: 03.
            problem = problem or ExcCodes.ILLEGAL_VALUE
            self.bad_clients.report("modbus_bad_request", peer, unit=unit, function_code=pdu[0],
                                    exception=int(problem), request=excerpt(pdu))
            return ExceptionResponse(pdu[0], problem)
        request.dev_id = unit
        self.state.request_seen()
        # pymodbus hands its SimCore to datastore_update where its annotation says ModbusServerContext.
        context = cast(ModbusServerContext, self.context)
        try:
            return await request.datastore_update(context, unit)
        except NoSuchIdException:
            return ExceptionResponse(request.function_code, ExcCodes.GATEWAY_NO_RESPONSE)


class Connection(ModbusProtocol):
    """One client's TCP connection: the stream split into MBAP frames, each request answered in the order sent.

    A PLC or gateway may pipeline requests, so one segment can hold several frames, and one frame can span
    segments; the transaction id in each response tells the client which request it answers.
    """

    def __init__(self, server: BridgeServer) -> None:
        params = CommParams(comm_name="server", comm_type=CommType.TCP, reconnect_delay=0.0,
                            reconnect_delay_max=0.0, timeout_connect=0.0)
        super().__init__(params, True)
        self.server = server
        self.peer: str | None = None
        self._buffer = bytearray()
        self._requests: deque[tuple[int, int, bytes]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._paused = False
        # Modbus TCP has no frame delimiter: after a header that is not Modbus the stream cannot be
        # resynchronised, so the requests before it are answered and then the connection is closed.
        self._hang_up = False

    def callback_new_connection(self) -> ModbusProtocol:
        raise RuntimeError("a client connection does not accept connections")

    def callback_connected(self) -> None:
        self.peer = _peer(self.transport)

    def callback_disconnected(self, exc: Exception | None) -> None:
        if self._worker is not None:
            self._worker.cancel()

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        return len(data)  # unused: data_received below takes the stream before pymodbus's path would

    def data_received(self, data: bytes) -> None:
        if self._hang_up:
            return
        self._buffer += data
        while len(self._buffer) >= MBAP.size:
            tid, protocol, length, unit = MBAP.unpack_from(self._buffer)
            if protocol != 0 or not 2 <= length <= MAX_PDU + 1:
                reason = f"protocol id {protocol}, not 0 (Modbus)" if protocol else f"MBAP length {length}, not 2-254"
                self.server.bad_clients.report("modbus_bad_frame", self.peer, reason=reason,
                                               data=excerpt(self._buffer), action="connection closed")
                self._buffer.clear()
                self._hang_up = True
                break
            end = MBAP.size - 1 + length
            if len(self._buffer) < end:
                break
            self._requests.append((tid, unit, bytes(self._buffer[MBAP.size:end])))
            del self._buffer[:end]
        if self._hang_up or len(self._requests) >= PIPELINE_LIMIT:
            self._reading(False)
        if (self._requests or self._hang_up) and (self._worker is None or self._worker.done()):
            self._worker = asyncio.create_task(self._answer())

    async def _answer(self) -> None:
        while self._requests:
            tid, unit, pdu = self._requests.popleft()
            frame = await self.server.respond(tid, unit, pdu, self.peer)
            if not isinstance(self.transport, asyncio.Transport):
                return  # closed meanwhile
            self.transport.write(frame)
            if not self._hang_up and len(self._requests) < PIPELINE_LIMIT // 2:
                self._reading(True)
            if self._requests:
                await asyncio.sleep(0)  # a long pipeline must not starve the other clients
        if self._hang_up:
            self.close()

    def _reading(self, on: bool) -> None:
        if self._paused == (not on) or not isinstance(self.transport, asyncio.Transport):
            return
        self._paused = not on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()


class PymodbusLogs(logging.Handler):
    """pymodbus's own log records as short, rate-limited structlog lines.

    pymodbus logs through stdlib logging, which nothing else in the station configures: its warnings
    reached stderr as bare text, and an error came with hex dumps of the last 20 frames appended (20 KB
    from one 4 KiB packet). The bridge frames and checks requests itself and logs bad clients itself, so
    only pymodbus's errors are kept, and only their first line.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines = BadClientLog(log)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.report("pymodbus_log", None, pymodbus_level=record.levelname.lower(),
                          message=record.getMessage().split("\n", 1)[0])


def quiet_pymodbus() -> None:
    logger = logging.getLogger("pymodbus")
    logger.handlers = [PymodbusLogs()]
    logger.propagate = False
    # Below ERROR pymodbus would only repeat what the bridge logs itself; the level also spares it
    # formatting hex dumps nobody reads.
    logger.setLevel(logging.ERROR)
