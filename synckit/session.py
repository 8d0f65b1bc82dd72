"""
One session per WebSocket connection: its identity, its subscriptions, and the pipeline every
incoming message goes through (docs/protocol.md section 3):

    decode -> chunk reassembly -> rate limit -> type and size checks -> handler -> (pong)

Messages of one connection are handled strictly in arrival order, one at a time: while a handler
waits on storage, later messages queue.  With in-memory storage nothing waits, and a message is
handled completely inside the call that delivered it.

Handlers raise L{Reject} for the protocol's expected errors; this is the one place that turns
them, and unexpected exceptions, into ``error`` frames.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Callable, Coroutine, Mapping, NamedTuple, Optional, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted.internet.interfaces import IReactorTime

from synckit import wire
from synckit.auth import Identity, Tokens
from synckit.chunks import ChunkAssembler, ChunkError, ChunkMemory
from synckit.config import Config
from synckit.limits import RateLimiter
from synckit.metrics import Metrics
from synckit.storage.interface import StorageRefused, StorageUnavailable
from synckit.sync.engine import SyncEngine
from synckit.tasks import BackgroundTasks, run_now


class Client(Protocol):
    """What a session needs from its transport (the WebSocket adapter, or a test fake)."""

    def send_frame(self, frame: wire.Frame, binary: bool) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class _Disconnected:
    """The client of a closed session: sends nothing, and keeps no connection in memory."""

    def send_frame(self, frame: wire.Frame, binary: bool) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass


_DISCONNECTED = _Disconnected()


class Handler(NamedTuple):
    """What a client message type does: see L{synckit.handlers}."""

    function: Callable[["Session", wire.Message], Optional[Coroutine[Any, Any, None]]]
    #: the error sent when the handler fails unexpectedly, and whether it names the document.
    failure: tuple[str, bool]


class Host(Protocol):
    """What sessions and their handlers use of the server that holds them."""

    config: Config
    clock: IReactorTime
    metrics: Metrics
    ids: wire.MessageIds
    tasks: BackgroundTasks
    tokens: Tokens
    engine: SyncEngine
    handlers: Mapping[str, Handler]
    #: the bound on unfinished chunk sets, shared by all the server's sessions
    chunk_memory: ChunkMemory

    def now_ms(self) -> int: ...

    def api_key_identity(self, key: Any) -> Optional[Identity]: ...

    def session_closed(self, session: "Session") -> None: ...


class Reject(Exception):
    """An expected protocol error: the client gets ``error`` with this text and details."""

    def __init__(self, error: str, details: Optional[dict[str, Any]] = None) -> None:
        super().__init__(error)
        self.error = error
        self.details = details


class Session:
    _log = Logger()
    # A server holds thousands of these: no per-instance __dict__.
    __slots__ = (
        "server", "client", "id", "ip", "identity", "authenticated", "binary",
        "subscriptions", "awareness", "chunks", "received_at", "_rate", "_invalid", "_queue", "_busy", "_open",
        "__weakref__",
    )  # fmt: skip

    def __init__(self, server: Host, client: Client, session_id: str, ip: str) -> None:
        self.server = server
        self.client = client
        self.id = session_id
        self.ip = ip
        self.identity: Optional[Identity] = None
        self.authenticated = False
        #: replies go out as binary frames until the client sends a text frame (docs/protocol.md,
        #: "Which encoding replies use").
        self.binary = True
        self.subscriptions: set[str] = set()
        self.awareness: set[str] = set()
        #: made on the first chunk: almost no connection ever sends one.
        self.chunks: Optional[ChunkAssembler] = None
        #: when (perf_counter) the message being handled arrived
        self.received_at = 0.0
        self._rate = RateLimiter(server.config.max_messages_per_minute)
        #: undecodable messages; made on the first one
        self._invalid: Optional[RateLimiter] = None
        #: messages waiting behind a handler that waits on storage; rarely more than a few.
        self._queue: list[tuple[bytes, bool]] = []
        self._busy = False
        self._open = True

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.ip}>"

    # Identity and subscriptions

    def authenticate(self, identity: Identity) -> None:
        self.identity = identity
        self.authenticated = True

    def require_auth(self) -> Identity:
        if not self.authenticated or self.identity is None:
            raise Reject("Not authenticated")
        return self.identity

    def expired(self, now: float) -> bool:
        """
        Whether the token this session authenticated with has expired; if so the session is
        closed (1008).  Checked before each message and by the server's housekeeping, so an idle
        connection stops receiving updates too; a client reconnects with a fresh token.
        """
        identity = self.identity
        if identity is None or identity.expires_at is None or now < identity.expires_at:
            return False
        self.error("Token expired", {"code": "AUTH_REQUIRED"})
        self.close(1008, "Token expired")
        return True

    def subscribe(self, doc_id: str) -> None:
        # A handler that waited on storage may finish after the connection closed: a closed
        # session must not become a subscriber again, or it would never be removed.
        if self._open:
            self.server.engine.subscribe(doc_id, self)

    def unsubscribe(self, doc_id: str) -> None:
        self.server.engine.unsubscribe(doc_id, self)

    # Output

    def send(self, frame: wire.Frame) -> None:
        if self._open:
            self.client.send_frame(frame, self.binary)

    def reply(self, type: str, body: dict[str, Any]) -> None:
        """Send a new message of C{type}; C{body} gets a fresh id."""
        now = self.server.now_ms()
        body["id"] = self.server.ids(now)
        self.send(wire.Frame(type, now, body))
        self.server.metrics.sent.inc(type)

    def error(self, error: str, details: Optional[dict[str, Any]] = None) -> None:
        body: dict[str, Any] = {"error": error}
        if details is not None:
            body["details"] = details
        self.server.metrics.errors.inc(details.get("code") if details else None)
        self.reply("error", body)

    def close(self, code: int, reason: str) -> None:
        """Close the connection; nothing more is sent or handled after this."""
        if self._open:
            self._open = False
            self._queue.clear()
            self.client.close(code, reason)

    # Input

    def receive(self, data: bytes, is_binary: bool) -> None:
        """Handle (or queue behind a handler that is waiting) one WebSocket message."""
        self._queue.append((data, is_binary))
        if not self._busy:
            self._drain()

    def _drain(self) -> None:
        while self._queue and self._open:
            data, is_binary = self._queue.pop(0)
            if not is_binary:
                self.binary = False
            waiting = self._handle(data)
            if waiting is not None and not waiting.called:
                self._busy = True
                waiting.addBoth(self._resume)
                self.server.tasks.add(waiting)
                return

    def _resume(self, result: Any) -> Any:
        self._busy = False
        self._drain()
        return result

    def _handle(self, data: bytes) -> Optional[Deferred]:
        self.received_at = started = perf_counter()
        metrics = self.server.metrics
        try:
            message = wire.decode(data, self._new_id, self.server.config.max_message_size)
        except wire.DecodeError:
            self._undecodable()
            return None
        kind = message["type"]
        metrics.received.inc(kind if isinstance(kind, str) else None)
        if kind == "delta_batch_chunk":
            return self._add_chunk(message)
        waiting = self._dispatch(message, len(data))
        if kind == "ping":
            # After the handler and any error it caused, rate-limited or not (docs/protocol.md section 3).
            if waiting is None or waiting.called:
                self.reply("pong", {})
            else:
                waiting.addBoth(lambda result: (self.reply("pong", {}), result)[1])
        if waiting is None or waiting.called:
            metrics.handling.observe(perf_counter() - started)
        else:
            waiting.addBoth(lambda result: (metrics.handling.observe(perf_counter() - started), result)[1])
        return waiting

    def _undecodable(self) -> None:
        """
        Answer a message that does not decode, up to C{max_invalid_messages_per_minute}; one more
        closes the connection (1008).  Undecodable messages never reach the message rate limit,
        and replying to each without end let one client get 200,000 error frames out of 200,000
        one-byte messages: a client that sends that much garbage is broken or hostile.
        """
        config = self.server.config
        if self._invalid is None:
            self._invalid = RateLimiter(config.max_invalid_messages_per_minute)
        if self._invalid.allow(self.server.clock.seconds()):
            self.error("Invalid message format")
            return
        self._log.info(
            "closing {session} ({ip}): more than {limit} invalid messages in a minute",
            session=self.id, ip=self.ip, limit=config.max_invalid_messages_per_minute,
        )  # fmt: skip
        self.error("Too many invalid messages", {"code": "INVALID_MESSAGE"})
        self.close(1008, "Too many invalid messages")

    def _new_id(self) -> str:
        return self.server.ids(self.server.now_ms())

    def _dispatch(self, message: wire.Message, size: int) -> Optional[Deferred]:
        now = self.server.clock.seconds()
        if self.expired(now):
            return None
        if not self._rate.allow(now):
            self.server.metrics.rate_limited += 1
            self.error("Too many messages. Please slow down.", {"code": "RATE_LIMIT_EXCEEDED"})
            return None
        # Size before type, as the reference validates.
        limit = self.server.config.max_message_size
        if wire.may_exceed(size, limit):
            length = wire.json_length(message)
            if length > limit:
                self.error(f"Message too large ({length} bytes, max {limit})", {"code": "INVALID_MESSAGE"})
                return None
        kind = message["type"]
        handler = self.server.handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            self.error(f"Invalid message type: {kind}", {"code": "INVALID_MESSAGE"})
            return None
        try:
            result = handler.function(self, message)
        except Exception:
            self._failed(Failure(), handler.failure, message)
            return None
        if result is None:
            return None
        try:
            waiting = run_now(result)
        except Exception:
            self._failed(Failure(), handler.failure, message)
            return None
        if waiting is not None:
            waiting.addErrback(self._failed, handler.failure, message)
        return waiting

    def _failed(self, failure: Failure, fallback: tuple[str, bool], message: wire.Message) -> None:
        if failure.check(Reject):
            self.error(failure.value.error, failure.value.details)
            return
        error, with_document = fallback
        details: dict[str, Any] = {"documentId": message.get("documentId")} if with_document else {}
        # Storage errors are the client's to retry (or not); storage logs the outage once.
        if failure.check(StorageUnavailable):
            self.error(f"{error}: storage unavailable, retry later", {**details, "code": "STORAGE_UNAVAILABLE"})
            return
        if failure.check(StorageRefused):
            self.error(f"{error}: {failure.getErrorMessage()}", {**details, "code": "INVALID_MESSAGE"})
            return
        self._log.failure(
            "{kind} from {session} failed", failure, kind=message.get("type"), session=self.id
        )
        self.error(error, details or None)

    def _add_chunk(self, message: wire.Message) -> Optional[Deferred]:
        if self.chunks is None:
            self.chunks = ChunkAssembler(memory=self.server.chunk_memory)
        try:
            whole = self.chunks.add(message, self.server.clock.seconds())
        except ChunkError as e:
            self._log.debug("dropped a chunk from {session}: {reason}", session=self.id, reason=str(e))
            return None
        if whole is None:
            return None
        try:
            reassembled = wire.decode(whole, self._new_id, self.server.config.max_message_size)
        except wire.DecodeError:
            self._log.debug("reassembled chunks from {session} do not decode", session=self.id)
            return None
        # A reassembled message skips chunking and the pong (docs/protocol.md, delta_batch_chunk);
        # a chunk inside a chunk set reaches the type check and is refused there.
        if reassembled["type"] == "delta_batch_chunk":
            self.error("Invalid message type: delta_batch_chunk", {"code": "INVALID_MESSAGE"})
            return None
        return self._dispatch(reassembled, len(whole))

    def closed(self) -> None:
        """
        The connection is gone: forget it everywhere (idempotent), and let go of what it held
        (its chunk sets, and the connection itself), since a handler still waiting on storage
        may keep the session for a while.
        """
        self._open = False
        self._queue.clear()
        if self.chunks is not None:
            self.chunks.clear()
            self.chunks = None
        self.client = _DISCONNECTED
        self.server.session_closed(self)
