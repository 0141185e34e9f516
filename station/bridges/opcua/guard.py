"""The OPC UA bridge's TCP gate (OPC UA Part 6, 7.1) in front of asyncua, and asyncua's logs as short lines.

The port faces the plant network. asyncua's server acknowledged any Hello and logged tracebacks for
malformed messages, so the bridge frames the TCP stream itself in front of asyncua (``GuardedProtocol``):
a message OPC UA Part 6 does not allow is answered with an Error message (ERR) and the connection closed,
with one rate-limited log line per client (station/bridges/badclients.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import urlparse

import structlog
from asyncua import ua
from asyncua.common.connection import TransportLimits
from asyncua.common.utils import Buffer
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.ua_binary import header_from_binary
from asyncua.ua.uaerrors import UaStatusCodeError

from station.bridges.badclients import BadClientLog, excerpt
from station.errors import ConfigError

log = structlog.get_logger("station.bridge.opcua")


def listen_url(url: str) -> tuple[str, int]:
    """(host, port) of an ``opc.tcp://HOST:PORT/PATH`` URL, or a ConfigError that says what is wrong."""
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "opc.tcp" or not parsed.hostname or port is None:
        raise ConfigError(f"--listen {url!r}: expected opc.tcp://HOST:PORT/PATH, e.g. opc.tcp://0.0.0.0:4840/station/")
    return parsed.hostname, port


@contextlib.contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    """Silence one asyncua logger: it logs a traceback for a failure we report in one line ourselves."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


class AsyncuaLogs(logging.Handler):
    """asyncua's own log records as short, rate-limited structlog lines.

    asyncua logs through stdlib logging, which nothing else in the station configures: its warnings
    reached stderr as bare text through logging's last resort, and each malformed message came with a
    traceback. The bad messages themselves never reach asyncua (GuardedProtocol answers them and logs
    one line); what asyncua still says (an idle client closed, a service fault) is kept, first line only.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines = BadClientLog(log)

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"asyncua_level": record.levelname.lower(),
                                  "message": record.getMessage().split("\n", 1)[0]}
        if record.exc_info is not None and record.exc_info[1] is not None:
            fields["error"] = record.exc_info[1]
        self.lines.report("asyncua_log", None, **fields)


@contextlib.contextmanager
def asyncua_logs_as_lines() -> Iterator[None]:
    """While the bridge serves, asyncua's records go through AsyncuaLogs only."""
    logger = logging.getLogger("asyncua")
    saved = logger.handlers, logger.propagate, logger.level
    logger.handlers = [AsyncuaLogs()]
    logger.propagate = False  # else logging's last resort prints them a second time, as bare text
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


#: MessageType, chunk type, MessageSize: the start of every OPC UA TCP message
HEADER = struct.Struct("<3scI")
#: a Hello after its header: ProtocolVersion, ReceiveBufferSize, SendBufferSize, MaxMessageSize,
#: MaxChunkCount, then the EndpointUrl's length (-1 for a null string)
HELLO = struct.Struct("<5Ii")
HELLO_MIN = HEADER.size + HELLO.size
#: the smallest secure-channel chunk: header, SecureChannelId, and a token id or sequence header
SECURE_MIN = HEADER.size + 4 + 8
SECURE_TYPES = (b"OPN", b"MSG", b"CLO")
CHUNK_TYPES = (b"F", b"C", b"A")
#: Part 6, 7.1.2.3: both buffer sizes of a Hello are at least 8192 bytes
MIN_BUFFER = 8192
#: Part 6, 7.1.2.3: the EndpointUrl of a Hello is at most 4096 bytes
MAX_ENDPOINT_URL = 4096
S = StatusCodes


class Fault(NamedTuple):
    """Why a message is refused: the StatusCode sent in the Error message, and its Reason."""

    code: int
    reason: str


def _shown(raw: bytes) -> str:
    return repr(raw.decode("latin-1"))  # any bytes, shown as the characters a protocol dump shows


def frame_fault(head: bytes, hello_seen: bool, max_chunk: int) -> Fault | None:
    """What is wrong with a message's 8-byte header, given what came before it on the connection."""
    kind, chunk, size = HEADER.unpack(head)
    if not hello_seen and kind != b"HEL":
        return Fault(S.BadTcpMessageTypeInvalid, f"message type {_shown(kind)} before a Hello")
    if hello_seen and kind not in SECURE_TYPES:
        what = "a second Hello" if kind == b"HEL" else f"message type {_shown(kind)}"
        return Fault(S.BadTcpMessageTypeInvalid, f"{what}; expected OPN, MSG or CLO")
    if kind == b"HEL" and chunk != b"F":
        return Fault(S.BadTcpMessageTypeInvalid, f"chunk type {_shown(chunk)} in a Hello; it is always 'F'")
    if chunk not in CHUNK_TYPES:
        return Fault(S.BadTcpMessageTypeInvalid, f"chunk type {_shown(chunk)}; expected 'F', 'C' or 'A'")
    if size > max_chunk:
        return Fault(S.BadTcpMessageTooLarge, f"MessageSize {size} over the receive buffer of {max_chunk} bytes")
    least = HELLO_MIN if kind == b"HEL" else SECURE_MIN
    if size < least:
        return Fault(S.BadDecodingError, f"MessageSize {size} under the {least} bytes of a {kind.decode()} header")
    return None


def hello_fault(message: bytes) -> Fault | None:
    """What is wrong with a whole Hello message (header included), if anything."""
    _, receive, send, _, _, url_length = HELLO.unpack_from(message, HEADER.size)
    for name, value in (("ReceiveBufferSize", receive), ("SendBufferSize", send)):
        if value < MIN_BUFFER:
            # The status the OPC Foundation's .NET stack uses for buffer sizes out of range.
            return Fault(S.BadTcpNotEnoughResources, f"{name} {value} under the {MIN_BUFFER} bytes OPC UA requires")
    if url_length > MAX_ENDPOINT_URL or url_length < -1:
        return Fault(S.BadTcpEndpointUrlInvalid, f"EndpointUrl length {url_length}; at most {MAX_ENDPOINT_URL}")
    if HELLO_MIN + max(url_length, 0) > len(message):
        return Fault(S.BadDecodingError, f"EndpointUrl length {url_length} runs past the Hello's end")
    try:
        message[HELLO_MIN:HELLO_MIN + max(url_length, 0)].decode("utf-8")
    except UnicodeDecodeError:
        return Fault(S.BadTcpEndpointUrlInvalid, "EndpointUrl is not UTF-8")
    return None


def error_message(fault: Fault) -> bytes:
    """An OPC UA TCP Error message (ERR): the StatusCode, then the Reason as a length-prefixed string."""
    reason = fault.reason.encode("utf-8")
    body = struct.pack("<Ii", fault.code, len(reason)) + reason
    return HEADER.pack(b"ERR", b"F", HEADER.size + len(body)) + body


def _address(peer: Any) -> str | None:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None


class GuardedProtocol(OPCUAProtocol):
    """asyncua's connection, with the TCP stream framed and checked here before asyncua parses it.

    asyncua acknowledged a Hello whatever its chunk type, buffer sizes or EndpointUrl, buffered a
    declared 4 GiB message without end, and logged a traceback for a message it could not parse while
    leaving the connection open. Here each message is checked against OPC UA Part 6 first; one that fails
    is answered with an Error message and the connection closed, as Part 6, 7.1.5 says, and logged once.
    """

    def __init__(self, iserver: InternalServer, policies: list[Any], clients: list[OPCUAProtocol],
                 closing_tasks: list[asyncio.Task[Any]], limits: TransportLimits, bad_clients: BadClientLog) -> None:
        super().__init__(iserver, policies, clients, closing_tasks, limits)
        self.bad_clients = bad_clients
        self._hello_seen = False
        # Until the Hello says otherwise: the server's own receive buffer.
        self._max_chunk = limits.max_recv_buffer
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused or self.processor is None:
            return  # refused (closing), or turned away at max_connections
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            fault = frame_fault(self._buffer[:HEADER.size], self._hello_seen, self._max_chunk)
            if fault is not None:
                self.refuse(fault, self._buffer)
                return
            size = HEADER.unpack_from(self._buffer)[2]
            if len(self._buffer) < size:
                return
            message, self._buffer = self._buffer[:size], self._buffer[size:]
            if not self._hello_seen:
                fault = hello_fault(message)
                if fault is not None:
                    self.refuse(fault, message)
                    return
                self._hello_seen = True
                # asyncua's ACK takes the smaller of the client's SendBufferSize and its own; so do we.
                self._max_chunk = min(self._max_chunk, HELLO.unpack_from(message, HEADER.size)[2])
            body = Buffer(message)
            header = header_from_binary(body)
            try:
                self.messages.put_nowait((header, body))
            except asyncio.QueueFull:
                self.refuse(Fault(S.BadTcpServerTooBusy, f"over {self.messages.maxsize} messages waiting"), message)
                return

    async def _process_one_msg(self, header: Any, buf: Buffer) -> bool:
        try:
            return await super()._process_one_msg(header, buf)
        except Exception as exc:  # asyncua's loop would log a traceback and carry on with the connection
            code = exc.code if isinstance(exc, UaStatusCodeError) else S.BadDecodingError
            self.refuse(Fault(code, f"{_shown(header.MessageType)} not understood: {type(exc).__name__}"),
                        error=exc)
            return False

    def refuse(self, fault: Fault, data: bytes | None = None, error: Exception | None = None) -> None:
        """Answer with an Error message, close, and log one line (or count it, over the rate)."""
        self._refused = True
        self._buffer = b""
        while not self.messages.empty():  # a Hello queued before the bad message must not be answered
            self.messages.get_nowait()
        fields: dict[str, Any] = {"status": ua.StatusCode(ua.UInt32(fault.code)).name, "reason": fault.reason,
                                  "action": "ERR sent, connection closed"}
        if data is not None:
            fields["data"] = excerpt(data)
        if error is not None:
            fields["error"] = error
        self.bad_clients.report("opcua_bad_message", _address(self.peer_name), **fields)
        if self.transport is not None:
            self.transport.write(error_message(fault))
            self.transport.close()  # after the queued ERR is sent


class GuardedBinaryServer(BinaryServer):
    """asyncua's listener, making GuardedProtocol connections; one bad-client log for all of them."""

    def __init__(self, iserver: InternalServer, host: str, port: int, limits: TransportLimits) -> None:
        super().__init__(iserver, host, port, limits)
        self.bad_clients = BadClientLog(log)

    def _make_protocol(self) -> OPCUAProtocol:
        return GuardedProtocol(self.iserver, self._policies, self.clients, self.closing_tasks, self.limits,
                               self.bad_clients)


class GuardedServer(Server):
    """asyncua's Server listening through GuardedBinaryServer."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.listen_address = host, port

    async def start(self) -> None:
        # Server.start as of asyncua 2.1, less the certificate check (this server has no certificate):
        # it builds its BinaryServer inline, with no hook to give it another protocol.
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            self.bserver = GuardedBinaryServer(self.iserver, *self.listen_address, self.limits)
            self.bserver.set_policies(self._policies)
            await self.bserver.start()
        except Exception:
            await self.iserver.stop()
            raise
