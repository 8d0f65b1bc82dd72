"""
The WebSocket adapter: Autobahn on one side, a L{synckit.session.Session} on the other.

It holds no sync logic.  It works out the client's address at the handshake, opens a session,
hands it every message, and sends the frames the session gives it, each framed once and cached on
the frame: a broadcast to a thousand subscribers is framed once.  What one read makes it send
leaves together at the end of that read (L{synckit.output}).  The session module says how a
message is handled.

It also bounds what a connection can cost when its client misbehaves (docs/security.md): bytes
waiting to be sent to a client that does not read, time to authenticate, and liveness counted
from pongs only.  And it leaves nothing of a closed connection in a reference cycle, so its memory
comes back when it closes rather than at the next full garbage collection.

Several of these go past Autobahn's interface, each for a reason given where it is done: the
module-wide masker, lazy C{hltype} and C{hlval}, the C{pformat} swap, C{onMessageEnd}, C{sendData} and C{send_queue},
C{sendCloseFrame}, C{closeHandshakeTimeoutCall}; and, past Twisted's, writing straight to the
socket (L{synckit.output}).  tests/test_dependencies.py checks each against the installed
Autobahn, and setup.py caps Autobahn below the next release line.
"""

from __future__ import annotations

import pprint
import struct
from typing import Any, Callable, Optional

from autobahn.twisted import websocket as autobahn_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import hltype, hlval
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from synckit.config import Config
from synckit.limits import UNIX_PEER, forwarded_client
from synckit.output import OutputBatch, backlog, plain_socket, write_now
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
    # Autobahn's peer is "tcp:1.2.3.4:5678", "tcp6:::1:5678", or "unix" / "unix:<path>".
    if peer.startswith("unix"):
        address = UNIX_PEER
    else:
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


class _Lazy:
    """A value formatted (by C{function}) only if a log message that holds it is ever formatted."""

    __slots__ = ("function", "value")

    def __init__(self, function: Callable[[Any], str], value: Any) -> None:
        self.function = function
        self.value = value

    def __format__(self, spec: str) -> str:
        return format(self.function(self.value), spec)


def _lazily(function: Callable[[Any], str]) -> Callable[[Any], _Lazy]:
    return lambda value: _Lazy(function, value)


# Autobahn colours the names and values of its debug lines (hltype, hlval) before it calls the
# logger, on every connection, frame and send, whether or not debug logging is on: 3% of the CPU
# of accepting connections.  Its modules use them only as arguments of log calls, so they can be
# formatted when the line is.
for _module in (autobahn_protocol, autobahn_twisted):
    _module.hltype = _lazily(hltype)  # type: ignore[attr-defined]
    _module.hlval = _lazily(hlval)  # type: ignore[attr-defined]


def _no_result(protocol: object) -> None:
    return None


@implementer(IPushProducer)
class SyncProtocol(WebSocketServerProtocol):
    """
    One WebSocket connection.  It is the push producer of its transport: the transport pauses it
    when its buffer is full and resumes it once that buffer is empty, and what is sent in between
    is counted against C{max_send_queue}: past it, the socket's real backlog decides whether the
    client is dropped.
    """

    _log = Logger()  # Autobahn owns .log
    factory: "SyncFactory"
    _session: Optional[Session] = None
    _ip = "unknown"
    #: whether the transport's buffer is full (paused), and the bytes sent since it filled
    _paused = False
    _unsent = 0
    _auth_deadline: Optional[IDelayedCall] = None
    #: frames held until the current output batch ends (L{synckit.output})
    _held: Optional[list[bytes]] = None
    #: the socket transport frames may go straight to (L{synckit.output.plain_socket})
    _socket: Optional[tcp.Connection] = None
    #: the server's output batch (L{synckit.output}), looked up once per connection
    _output: OutputBatch

    def __init__(self) -> None:
        super().__init__()
        # Autobahn fires is_closed with the protocol itself, which the Deferred then holds as
        # its result: a cycle that kept every closed connection (and all it references) until
        # the cyclic garbage collector ran.  Nothing here waits on it.
        self.is_closed.addCallback(_no_result)

    def _connectionMade(self) -> None:
        # Autobahn pretty-prints its 40-odd options for a debug line on every new connection,
        # whether or not debug logging is on: about 15% of the CPU of accepting connections.
        # Here the same line is formatted only if something logs it.
        module = autobahn_protocol.__dict__
        module["pformat"] = _lazily(pprint.pformat)
        try:
            super()._connectionMade()
        finally:
            module["pformat"] = pprint.pformat
        # Autobahn sets TCP_NODELAY in connectionMade, before _connectionMade has copied the
        # factory's tcpNoDelay option onto the protocol, and swallows the AttributeError: Nagle
        # stayed on, and a reply written after the client's last packet waited up to 40 ms for
        # its delayed ACK (every other round trip on PostgreSQL).
        try:
            self.transport.setTcpNoDelay(self.tcpNoDelay)
        except (AttributeError, OSError):
            pass  # not TCP: a unix socket
        self._socket = plain_socket(self.transport)
        self._output = self.factory.sync_server.output

    def dataReceived(self, data: bytes) -> None:
        # What the messages of one read make the server send leaves when they are all handled:
        # each connection's frames together, in one system call.
        with self._output:
            super().dataReceived(data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: Optional[int] = None) -> None:
        # Autobahn's own writes (handshake, pong, close) go after the frames we hold, which were
        # sent before them.  They keep Twisted's buffered write, which sends them a reactor turn
        # later: a close frame then leaves with the TCP close that follows it.  Sent at once, a
        # reconnecting client got its old socket's close frame well before the TCP close, and
        # SyncKit's own test client, which does not tell its sockets' events apart, took the old
        # socket's late close for the new one's: its offline conflict tests failed 11 to 14
        # times out of 21 instead of 2 to 6.
        if self._held is not None:
            self.release()
        super().sendData(data, sync, chopsize)

    def onConnect(self, request: Any) -> None:
        self._ip = client_ip(request.headers, request.peer, self.factory.sync_server.config.trusted_proxies)

    def onOpen(self) -> None:
        server = self.factory.sync_server
        self._session = server.open_session(self, self._ip)
        try:
            self.transport.registerProducer(self, True)
        except RuntimeError:
            # An upgrade that came through twisted.web leaves its HTTP channel registered as
            # the transport's producer; the channel is done, and a transport has one producer.
            self.transport.unregisterProducer()
            self.transport.registerProducer(self, True)
        config = server.config
        if config.auth_required and config.auth_timeout and self.state == WebSocketProtocol.STATE_OPEN:
            self._auth_deadline = server.clock.callLater(config.auth_timeout / 1000, self._auth_overdue)

    def _auth_overdue(self) -> None:
        """
        A connection that has not authenticated in C{auth_timeout} is closed (1008): it can do
        nothing but ping, and otherwise holds a connection slot forever.
        """
        self._auth_deadline = None
        session = self._session
        if session is None or session.authenticated:
            return
        self._log.info(
            "closing {session} ({ip}): not authenticated within {timeout} ms",
            session=session.id, ip=self._ip, timeout=self.factory.sync_server.config.auth_timeout,
        )  # fmt: skip
        session.error("Authentication timeout", {"code": "AUTH_REQUIRED"})
        session.close(1008, "Authentication timeout")

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
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
            self._auth_deadline = None
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
        if self._paused:
            self._unsent += len(framed)
            limit = self.factory.sync_server.config.max_send_queue
            if self._unsent > limit:
                # Counted since the buffer filled, so some may have been read meanwhile: a
                # client that reads, but not as fast as a busy document sends, keeps the buffer
                # from ever emptying.  The socket's real backlog decides, where it can be read.
                queued = backlog(self.transport)
                if queued is None or queued + len(framed) > limit:
                    self._overflow()
                    return
                self._unsent = queued + len(framed)
        if self.send_queue:
            self.sendData(framed)  # keep Autobahn's order behind anything it queued itself
            return
        # What sendPreparedMessage -> sendData would do, less a debug line Autobahn formats on
        # every send whether or not debug logging is on (about 5% of a busy server's CPU).
        output = self._output
        if output.active:
            if self._held is None:
                self._held = [framed]
                output.hold(self)
            else:
                self._held.append(framed)
        else:
            self._write(framed)

    def release(self) -> None:
        """Send the frames held during an output batch, together."""
        held, self._held = self._held, None
        if held and self.state != WebSocketProtocol.STATE_CLOSED:  # not dropped meanwhile
            self._write(held[0] if len(held) == 1 else b"".join(held))

    def _write(self, data: bytes) -> None:
        if self._socket is not None:
            write_now(self._socket, data)
        else:
            self.transport.write(data)

    def close(self, code: int, reason: str) -> None:
        # sendClose() refuses the protocol's own codes (1001, 1008); the frame method does not.
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def _overflow(self) -> None:
        """
        Over C{max_send_queue} bytes wait for a client that does not read them: drop the
        connection, discarding the queue at once.  A close frame would wait
        behind everything the client is not reading, and so would the memory.
        """
        session = self._session
        self._log.warn(
            "dropped {session} ({ip}): over {limit} bytes queued that it does not read",
            session=session.id if session is not None else None, ip=self._ip,
            limit=self.factory.sync_server.config.max_send_queue,
        )  # fmt: skip
        self.dropConnection(abort=True)

    # IPushProducer, for the transport

    def pauseProducing(self) -> None:
        """
        The transport's buffer is full: count what is sent until it is empty again.  Twisted
        says so on every write while it stays full, so only the first call starts the count.
        """
        if not self._paused:
            self._paused = True
            self._unsent = 0

    def resumeProducing(self) -> None:
        """The transport's buffer is empty: the client reads."""
        self._paused = False

    def stopProducing(self) -> None:
        """The connection is gone; onClose does the rest."""


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
            # Only a pong proves the peer reads: by default any message it sends would count,
            # and a client that sends but never reads would never be found dead.
            autoPingRestartOnAnyTraffic=False,
            # Close over-size messages with 1009 instead of dropping TCP, so replies already
            # queued for that client are delivered first.
            failByDrop=False,
            # A plain GET /ws is not a WebSocket: no Autobahn status page (it names versions).
            webStatus=False,
            # The opening handshake reaches Autobahn whole (synckit.upgrade routes a complete
            # request, twisted.web rebuilds one) and onConnect answers at once, so it is done
            # within the read that brought it: the timer Autobahn would set for it on every
            # connection was cancelled before it could fire.  A client that never sends a whole
            # request is dropped by the router's idle timeout or the site's header timeout.
            openHandshakeTimeout=0,
        )
