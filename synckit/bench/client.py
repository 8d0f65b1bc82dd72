"""
One benchmark connection: Autobahn's Twisted client, speaking the SyncKit protocol through
L{synckit.wire} (binary frames, or JSON text frames), or raw bytes to an echo endpoint.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint

from synckit import wire


class BenchError(Exception):
    """The server cannot be reached or does not behave: the run stops with this message."""


class Refused(BenchError):
    """The server answered a request with an error."""


class BenchClient(WebSocketClientProtocol):
    """
    Sends messages and hands every message received to C{on_message} (decoded, or raw bytes
    in echo mode).  Counts what does not decode instead of failing the run.
    """

    #: bytes read from the socket at a time (Twisted reads 64 KiB): the text scenario relays
    #: states of hundreds of KiB to every writer, which would take a reactor turn per 64 KiB
    read_size = 1024 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self.on_message: Callable[[Any], None] = lambda message: None
        #: offered each message's bytes (and whether binary) first; True takes it undecoded
        self.on_raw: Optional[Callable[[bytes, bool], bool]] = None
        self.undecodable = 0
        self._waiting: list[tuple[Callable[[dict[str, Any]], bool], Deferred]] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        # Autobahn's own attempt fails silently: it reads its tcpNoDelay option before copying
        # the factory's options onto the protocol.  Without it a small message sent while the
        # previous one is unacknowledged waits for the peer's delayed ACK (40 ms on Linux).
        self.transport.setTcpNoDelay(True)
        self.transport.bufferSize = self.read_size

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if not self.opened.called:
            self.opened.errback(BenchError(f"the WebSocket handshake failed: {reason or code}"))
        for _, d in self._waiting:
            d.errback(BenchError(f"the server closed the connection ({code}: {reason})"))
        self._waiting = []
        self.closed.callback((code, reason))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.factory.raw:
            self.on_message(payload)
            return
        if self.on_raw is not None and self.on_raw(payload, isBinary):
            return
        try:
            message = wire.decode(payload, lambda: "") if isBinary else json.loads(payload)
        except (wire.DecodeError, ValueError):
            self.undecodable += 1
            return
        for entry in self._waiting:
            if entry[0](message):
                self._waiting.remove(entry)
                entry[1].callback(message)
                return
        self.on_message(message)

    def send(self, kind: str, payload: dict[str, Any]) -> None:
        """A SyncKit message, as a binary frame or (with text) a JSON text frame."""
        binary = not self.factory.text
        self.sendMessage(wire.Frame(kind, int(time.time() * 1000), payload).encoded(binary), binary)

    def request(self, kind: str, payload: dict[str, Any], answer: Callable[[dict[str, Any]], bool], timeout: float, clock: Any) -> Deferred:
        """Send, and fire with the first message that C{answer} accepts (an error reply fails it)."""
        d: Deferred = Deferred()

        def accept(message: dict[str, Any]) -> bool:
            return answer(message) or message.get("type") in ("error", "auth_error")

        self._waiting.append((accept, d))
        self.send(kind, payload)
        d.addTimeout(timeout, clock)

        def check(message: dict[str, Any]) -> dict[str, Any]:
            if message.get("type") in ("error", "auth_error"):
                raise Refused(f"the server refused {kind}: {message.get('error') or message}")
            return message

        return d.addCallback(check)


class Connector:
    """Opens benchmark connections to one URL."""

    def __init__(
        self, reactor: Any, url: str, text: bool = False, raw: bool = False, token: Optional[str] = None, timeout: float = 15.0
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise BenchError(f"not a ws:// URL: {url}")
        self.reactor = reactor
        self.url = url
        self.token = token
        #: seconds to wait for each reply while setting a connection up
        self.timeout = timeout
        self._endpoint = HostnameEndpoint(reactor, parts.hostname, parts.port or 80, timeout=10)
        self._factory = WebSocketClientFactory(url)
        self._factory.protocol = BenchClient
        self._factory.setProtocolOptions(perMessageCompressionOffers=[], openHandshakeTimeout=10)
        self._factory.text = text
        self._factory.raw = raw

    async def open(self) -> BenchClient:
        try:
            client = await self._endpoint.connect(self._factory)
        except Exception as e:
            raise BenchError(f"cannot connect to {self.url}: {e}") from None
        await client.opened
        return client

    async def session(self, client_id: str, doc_id: Optional[str]) -> BenchClient:
        """Open, authenticate, and subscribe to C{doc_id} (if given), as the SDK does."""
        client = await self.open()
        timeout = self.timeout
        auth: dict[str, Any] = {"id": f"auth-{client_id}", "clientId": client_id}
        if self.token:
            auth["token"] = self.token
        try:
            try:
                await client.request("auth", auth, lambda m: m.get("type") == "auth_success", timeout, self.reactor)
            except TimeoutError:
                raise BenchError(f"no auth_success from {self.url} within {timeout:g} s: is it a SyncKit server?") from None
            if doc_id is not None:
                await client.request(
                    "subscribe", {"id": f"sub-{client_id}", "documentId": doc_id},
                    lambda m: m.get("type") == "sync_response", timeout, self.reactor,
                )  # fmt: skip
        except Exception:
            client.dropConnection(abort=True)
            await client.closed
            raise
        return client
