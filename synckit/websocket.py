"""
The WebSocket adapter: Autobahn on one side, a L{synckit.session.Session} on the other.

It holds no sync logic.  It works out the client's address at the handshake, opens a session,
hands it every message, and sends the frames the session gives it, each framed once and cached on
the frame: a broadcast to a thousand subscribers is framed once.  The wire protocol is
in ../shared/PROTOCOL.md (sections 2-4); the session module says how a message is handled.
"""

from __future__ import annotations

import pprint
import struct
from typing import Any, Optional

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.logger import Logger

from synckit.config import Config
from synckit.limits import forwarded_client
from synckit.server import SyncServer
from synckit.session import Session
from synckit.wire import Frame


def client_ip(headers: dict[str, str], peer: str, trusted_proxies: tuple[Any, ...] = ()) -> str:
    """
    The client's address: the socket's peer, or, when the peer is one of C{trusted_proxies}
    (C{Config.trusted_proxies}), the address the proxy forwarded.  The reference believes
    ``X-Forwarded-For`` from anyone, which lets a client pick its address past the per-address
    limit; here, with no trusted proxies, the headers are ignored.
    """
    # Autobahn's peer is "tcp:1.2.3.4:5678" or "tcp6:::1:5678".
    address = peer.partition(":")[2].rpartition(":")[0] or "unknown"
    return forwarded_client(address, headers.get("x-forwarded-for"), headers.get("x-real-ip"), trusted_proxies)


def websocket_frame(payload: bytes, binary: bool) -> bytes:
    """
    One unfragmented, unmasked server-to-client frame (RFC 6455 section 5.2): what Autobahn's
    prepareMessage builds when nothing is compressed, without its per-message object.
    """
    opcode = 0x82 if binary else 0x81  # FIN + binary or text
    n = len(payload)
    if n < 126:
        return bytes((opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", opcode, 126, n) + payload
    return struct.pack("!BBQ", opcode, 127, n) + payload


#: payloads up to this many bytes are unmasked by L{SmallFrameMasker}, larger ones by Autobahn
SMALL_FRAME = 1024


class SmallFrameMasker:
    """
    Unmasks a small client frame (RFC 6455 section 5.3) as one XOR of two Python integers.
    Autobahn's native masker allocates three cffi objects per frame, which for the 100-byte
    messages of a sync session costs more than the XOR (5 us against 1.5 us a frame, about 7% of
    a busy server's CPU); from about 2 KB on, the native one is faster.  Autobahn's masker
    interface: the payload may come in several pieces, C{pointer} counts what was processed.
    """

    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask: bytes) -> None:
        self._mask = bytes(mask)
        self._ptr = 0

    def pointer(self) -> int:
        return self._ptr

    def reset(self) -> None:
        self._ptr = 0

    def process(self, data: bytes) -> bytes:
        n = len(data)
        shift = self._ptr & 3
        mask = self._mask[shift:] + self._mask[:shift] if shift else self._mask
        self._ptr += n
        key = (mask * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def create_masker(mask: bytes, length: Optional[int] = None) -> Any:
    """Autobahn's masker factory, with small frames going to L{SmallFrameMasker}."""
    if length is not None and length <= SMALL_FRAME:
        return SmallFrameMasker(mask)
    return create_xor_masker(mask, length)


# Autobahn looks its masker factory up in its protocol module for every frame; there is no option.
autobahn_protocol.create_xor_masker = create_masker


class _Deferred:
    """A value pretty-printed only if a log message that holds it is ever formatted."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return format(pprint.pformat(self.value), spec)


class SyncProtocol(WebSocketServerProtocol):
    _log = Logger()  # Autobahn owns .log
    factory: "SyncFactory"
    _session: Optional[Session] = None
    _ip = "unknown"

    def _connectionMade(self) -> None:
        # Autobahn pretty-prints its 40-odd options for a debug line on every new connection,
        # whether or not debug logging is on: about 15% of the CPU of accepting connections.
        # Here the same line is formatted only if something logs it.
        module = autobahn_protocol.__dict__
        module["pformat"] = _Deferred
        try:
            super()._connectionMade()
        finally:
            module["pformat"] = pprint.pformat

    def onConnect(self, request: Any) -> None:
        self._ip = client_ip(request.headers, request.peer, self.factory.sync_server.config.trusted_proxies)

    def onOpen(self) -> None:
        self._session = self.factory.sync_server.open_session(self, self._ip)

    def onMessageEnd(self) -> None:
        # Autobahn's own also fires a "message" event for observers, through a Deferred and
        # callbacks made for every message (about 6% of a busy server's CPU); we observe nothing.
        if not self.failedByMe:
            self.onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._session is not None:
            self._session.receive(payload, isBinary)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        # Autobahn leaves its close-handshake timer running when the peer drops TCP instead of
        # answering our close; cancel it so nothing of a closed connection stays scheduled.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        if self._session is not None:
            self._session.closed()
            self._session = None

    # synckit.session.Client

    def send_frame(self, frame: Frame, binary: bool) -> None:
        if self.state != WebSocketProtocol.STATE_OPEN:
            return
        framed = frame.cache.get(binary)
        if framed is None:
            # The WebSocket frame, built once per frame and encoding (we never negotiate
            # compression, so one framing fits every connection).
            framed = frame.cache[binary] = websocket_frame(frame.encoded(binary), binary)
        if self.send_queue:
            self.sendData(framed)  # keep Autobahn's order behind anything it queued itself
        else:
            # What sendPreparedMessage -> sendData would do, less a debug line Autobahn formats
            # on every send whether or not debug logging is on (about 5% of a busy server's CPU).
            self.transport.write(framed)

    def close(self, code: int, reason: str) -> None:
        # sendClose() refuses the protocol's own codes (1001, 1008); the frame method does not.
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)


class EchoProtocol(WebSocketServerProtocol):
    """``/echo``: each message straight back, for measuring the WebSocket layer alone."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def echo_factory(config: Config) -> WebSocketServerFactory:
    factory = WebSocketServerFactory(url=None)
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(
        maxMessagePayloadSize=config.max_frame_size, maxFramePayloadSize=config.max_frame_size, webStatus=False
    )
    return factory


class SyncFactory(WebSocketServerFactory):
    protocol = SyncProtocol

    def __init__(self, server: SyncServer, config: Config) -> None:
        super().__init__(url=None)  # a URL would pin the port, and port 0 is refused
        self.sync_server = server  # not .server: Autobahn sends that as the Server header
        interval = config.heartbeat_interval / 1000
        self.setProtocolOptions(
            maxMessagePayloadSize=config.max_frame_size,
            maxFramePayloadSize=config.max_frame_size,
            autoPingInterval=interval,
            autoPingTimeout=interval,
            # Close over-size messages with 1009 instead of dropping TCP, so replies already
            # queued for that client are delivered first.
            failByDrop=False,
            # A plain GET /ws is not a WebSocket: no Autobahn status page (it names versions).
            webStatus=False,
        )
