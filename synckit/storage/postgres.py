"""
Storage in PostgreSQL, over txpostgres.

The tables are the reference server's, so either server reads what the other wrote.  A save is
one statement and so one transaction, which the ``ack`` waits for: ``synckit_save`` (migration
003) writes the fields, the text and the delta log of any number of documents.  A field write
touches only its own row of ``synckit_fields`` (``synckit_save_writes``, migration 005), so it
costs the same in a document of ten fields or ten thousand; ``documents.state``, the copy in the
reference's shape, is brought up to date in the background (L{PostgresStorage.sync_state}, every
``state-sync-interval``), once per document however many writes it had.  Text is merged
here and stored compare-and-set: the merge starts from the text the server last had confirmed,
and if another instance stored text since, the save is refused whole, the stored text read and
the merge done again, so that instances saving text at once all keep their edits.

Every connection of the pool has a dead-connection detector: when PostgreSQL goes away, calls on
that connection fail at once and it reconnects in the background with back-off.  Calls fail with
L{StorageUnavailable} while it is down, or when PostgreSQL does not answer within the timeout;
the server refuses writes then, and keeps serving what it has cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence
from urllib.parse import urlsplit

import orjson
import psycopg2
import psycopg2.errors
from psycopg2.extras import Json
from twisted.internet.defer import CancelledError, Deferred, FirstError
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import reconnection, retrying, txpostgres
from zope.interface import implementer

from synckit.storage import schema
from synckit.storage.interface import (
    Cleaned,
    DocumentWrites,
    IStorage,
    StorageRefused,
    StorageTimeout,
    StorageUnavailable,
    StoredDocument,
)
from synckit.sync.document import MAX_CLOCK_ENTRIES, Stamp, Text
from synckit.sync.fugue import FugueText, TextStateError
from synckit.timeouts import cancel, within

#: The state as JSON text, parsed here (L{read_json}), not by psycopg2; the clock's most recently
#: raised entries, up to the bound every loaded clock keeps; and the field rows (migration 005):
#: every row's stamp, and the value of those not yet folded into the state (C{pending}).
_LOAD = (
    "SELECT d.state::text, (SELECT json_object_agg(client_id, clock_value) FROM"
    " (SELECT client_id, clock_value FROM vector_clocks WHERE document_id = d.id"
    " ORDER BY updated_at DESC, client_id LIMIT %s) c),"
    " (SELECT json_agg(json_build_array(f.field, f.ts, f.counter, f.writer, f.pending, f.value IS NULL,"
    " CASE WHEN f.pending THEN f.value END)) FROM synckit_fields f WHERE f.document_id = d.id)::text"
    " FROM documents d WHERE d.id = %s"
)
_CLEANUP = "SELECT deltas, documents, tombstones FROM synckit_cleanup(to_timestamp(%s), %s, %s)"

#: rows (delta log, and tombstones) one cleanup transaction handles at most
CLEANUP_BATCH = 1000
_SYNC_STATE = "SELECT synckit_sync_state(%s)"
#: documents whose state one transaction of L{PostgresStorage.sync_state} brings up to date at most
SYNC_BATCH = 100
_LOAD_TEXT = "SELECT state->>'crdt', state->'clock' FROM documents WHERE id = %s"

#: how many times a text save is merged again after other instances' saves got in first
TEXT_ATTEMPTS = 5

#: Errors that mean PostgreSQL could not be reached or the connection broke (retry later) ...
_UNAVAILABLE = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    reconnection.ConnectionDead,
    txpostgres.RollbackFailed,  # a transaction whose connection broke
)
#: ... and errors about the data itself, which no retry will fix.
_REFUSED = (psycopg2.DataError,)


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path or ''}"


def _backoff() -> Iterator[float]:
    """Reconnect at once, then after 0.5 s growing to 5 s: an outage is noticed soon after it ends."""
    return retrying.simpleBackoffIterator(initialDelay=0.5, maxDelay=5.0, factor=1.7, maxRetries=0, now=True)


def _json(value: Any) -> Json:
    return Json(value, dumps=lambda v: orjson.dumps(v).decode("utf-8"))


class _Pool(txpostgres.ConnectionPool):
    """txpostgres' fixed-size pool, on our reactor, of connections that C{connect} makes."""

    def __init__(self, reactor: Any, connect: Callable[[], txpostgres.Connection], url: str, size: int, **options: Any):
        self.reactor = reactor
        self.connectionFactory = lambda reactor, cooperator: connect()
        super().__init__(None, url, min=size, **options)


class _Connection(txpostgres.Connection):
    """
    txpostgres' connection, without its standing registration as a reactor reader.  txpostgres
    watches every idle connection to hear NOTIFY, which we never use; when PostgreSQL goes away,
    libpq closes the socket under that registration and the epoll reactor's bookkeeping goes
    stale (errors on later, unrelated descriptors).  Here the socket is watched only while a
    connection attempt or a query is polling it, and txpostgres unregisters those before each
    poll; a dead idle connection is noticed by its next query, which fails and reconnects.
    """

    def connect(self, *args: Any, **kwargs: Any) -> Deferred:
        return super().connect(*args, **kwargs).addCallback(self._stop_reading)

    def _stop_reading(self, result: Any) -> Any:
        self.reactor.removeReader(self)
        return result

    def doRead(self) -> None:
        txpostgres._PollingMixin.doRead(self)

    def cursorFinished(self, cursor: Any) -> None:
        self._cursors.remove(cursor)

    def close(self) -> None:
        """
        Unwatch the socket, then close it (txpostgres' order), also when a connection attempt is
        still polling it.  Never the other way round: a socket closed while the reactor watches
        it leaves the epoll reactor's bookkeeping stale, and later, unrelated connections that
        get the same descriptor fail.  A connection that never got as far as a socket has
        nothing to close.
        """
        if self._connection is not None:
            super().close()


#: SQLSTATEs (by prefix) of errors that end the connection or the server: connection failures,
#: shutdowns and "cannot connect now" (``57P``, not ``57014``, a cancelled query), resources and
#: system errors, internal errors.
_DEAD_CONNECTION_CODES = ("08", "53", "57P", "58", "XX")


def _connection_died(failure: Failure) -> bool:
    """
    Whether a failed call means its connection is dead.  txpostgres takes every
    C{OperationalError} for that, but psycopg2 files under it many errors that PostgreSQL reports
    on a connection that stays fine: a serialization failure (what C{synckit_save} raises when
    another instance stored text first), a deadlock, a lock not available (C{lock_timeout}), a
    cancelled query.  Taken for a death, each would drop its connection, and the retry
    could find the pool reconnecting and fail the write with C{STORAGE_UNAVAILABLE}.  So an
    error PostgreSQL reported (it has a SQLSTATE) kills the connection only if its code says so;
    one without (the socket broke, libpq gave up) does.
    """
    if not reconnection.defaultDeathChecker(failure):
        return False
    code = getattr(failure.value, "pgcode", None)
    return code is None or code.startswith(_DEAD_CONNECTION_CODES)


class _Detector(reconnection.DeadConnectionDetector):
    """
    txpostgres' detector, with a handle on its reconnection loop so that stopping can end it,
    and deaf to errors that leave the connection fine (L{_connection_died}).
    """

    def __init__(self, reactor: Any, died: Callable[[Failure], None]) -> None:
        super().__init__(deathChecker=_connection_died, reconnectionIterator=_backoff, reactor=reactor)
        self._died = died
        self._retrying: Optional[Deferred] = None
        self._stopped = False

    def startReconnecting(self, f: Failure) -> None:
        if self._stopped:
            return
        self._died(f)
        call = retrying.RetryingCall(self.reconnect)
        call.reactor = self.reactor
        self._retrying = call.start(self.reconnectionIterator())
        self._retrying.addCallback(lambda _: self.connectionRecovered())
        # Reconnection only ends by stopping; whatever the attempt under way says then is moot.
        self._retrying.addErrback(lambda f: None if self._stopped else f)

    def connectionRecovered(self) -> Deferred:
        self._retrying = None
        return super().connectionRecovered()

    def stop(self) -> None:
        """End reconnecting, now and for good: the storage is closing its connections."""
        self._stopped = True
        if self._retrying is not None:
            cancel(self._retrying)  # an attempt under way is ended by closing its connection


@implementer(IStorage)
class PostgresStorage:
    name = "postgres"
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        pool_size: int = 10,
        timeout: float = 5.0,
        auto_migrate: bool = False,
        observe: Optional[Callable[[str, float], None]] = None,
    ) -> None:
        """
        @param observe: called with (operation, seconds) after each call that PostgreSQL
            answered, for the metrics.
        """
        self._reactor = reactor
        self._observe = observe
        self._url = url
        self._timeout = timeout
        self._auto_migrate = auto_migrate
        self._connections: list[txpostgres.Connection] = []
        self._pool = _Pool(reactor, self._connection, url, pool_size, connect_timeout=max(1, int(timeout)))
        #: how many times a pooled connection came back after PostgreSQL went away
        self.reconnects = 0
        self._started = False

    def _connection(self) -> txpostgres.Connection:
        detector = _Detector(self._reactor, self._died)
        detector.addRecoveryHandler(self._recovered)
        connection = _Connection(self._reactor, detector=detector)
        self._connections.append(connection)
        return connection

    def _died(self, failure: Failure) -> None:
        self._log.warn(
            "lost a PostgreSQL connection to {database}: {error}; reconnecting",
            database=describe(self._url),
            error=failure.getErrorMessage().strip(),
        )

    def _recovered(self) -> None:
        self.reconnects += 1
        self._log.info("PostgreSQL connection to {database} is back", database=describe(self._url))

    # Lifecycle

    async def _start(self) -> None:
        try:
            await self._within(self._pool.start(), "connecting")
        except FirstError as e:
            self._pool.close()
            error = e.subFailure.value
            raise StorageUnavailable(f"cannot connect to PostgreSQL at {describe(self._url)}: {error_text(error)}") from None
        except Exception as e:
            self._pool.close()
            raise StorageUnavailable(f"cannot connect to PostgreSQL at {describe(self._url)}: {error_text(e)}") from None
        try:
            if self._auto_migrate:
                await self._migrate()
            await schema.check(self._pool)
        except Exception:
            self._pool.close()
            raise
        self._started = True

    def start(self) -> Deferred:
        return Deferred.fromCoroutine(self._start())

    async def _migrate(self) -> None:
        connection = txpostgres.Connection(self._reactor)
        await connection.connect(self._url, connect_timeout=max(1, int(self._timeout)))
        try:
            await schema.Migrator(connection).migrate()
        finally:
            connection.close()

    async def _stop(self) -> None:
        await self._last_sync()
        for connection in self._connections:
            connection.detector.stop()
        for connection in self._connections:
            # Every connection, busy or not (the pool only knows its idle ones), once its query
            # in flight is done: txpostgres mishandles closing under a running query.
            try:
                await self._within(connection.lock.acquire(), "the last query before closing")
            except StorageUnavailable:
                self._log.warn("closing a PostgreSQL connection with a query still running")
            connection.close()
        # txpostgres reports outcomes one reactor turn late (callLater(0)): let them land.
        await deferLater(self._reactor, 0, lambda: None)

    def stop(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _last_sync(self) -> None:
        """
        Bring C{documents.state} up to date before closing, so that a database this instance
        leaves (say, to the reference server) holds every write in the reference's shape.  If
        PostgreSQL cannot do it now, whichever instance runs next does.
        """
        if not self._started:
            return  # nothing was written through us
        try:
            synced = await self._sync_state()
        except (StorageUnavailable, StorageRefused) as e:
            self._log.warn("documents.state left behind at shutdown: {error}", error=e)
            return
        if synced:
            self._log.info("brought documents.state of {documents} documents up to date", documents=synced)

    # Calls

    def _within(self, d: Deferred, what: str) -> Deferred:
        """
        C{d}'s result, or L{StorageTimeout} after the timeout (L{synckit.timeouts.within}); the
        timeout's C{settled} fires when the call really ends, and its late result is dropped.
        The query is not cancelled on the server: libpq's cancel request opens a new connection
        and blocks the reactor while it does, which a network partition would stretch to minutes.
        """

        def late(settled: Deferred) -> StorageTimeout:
            return StorageTimeout(f"PostgreSQL did not answer {what} within {self._timeout:g} s", settled)

        return within(d, self._timeout, self._reactor, late, cancelling=False)

    async def _call(self, what: str, run: Callable[[], Deferred]) -> Any:
        """
        Run a pooled call, within the timeout, with errors turned into the storage's own.  A
        connection already known dead refuses the call at once, and one that PostgreSQL closed
        while it was idle (a restart) fails its next call and reconnects: either way the call
        is tried on the other connections before giving up.  Every call is safe to repeat (a
        write whose stamps are stored already changes nothing).
        """
        attempts = len(self._pool.connections) + 1
        for attempt in range(attempts):
            started = time.perf_counter()
            try:
                result = await self._within(run(), what)
                if self._observe is not None:
                    self._observe(what, time.perf_counter() - started)
                return result
            except psycopg2.errors.SerializationFailure:
                raise _TextChanged() from None
            except CancelledError:
                # synckit never cancels a query (the timeout abandons it), so PostgreSQL did:
                # txpostgres reports its "canceling statement" error as a cancellation.
                raise StorageUnavailable(
                    f"PostgreSQL at {describe(self._url)} cancelled the {what} (statement_timeout, or pg_cancel_backend)"
                ) from None
            except _UNAVAILABLE as e:
                if attempt + 1 == attempts:
                    reason = "" if isinstance(e, reconnection.ConnectionDead) else f": {error_text(e)}"
                    raise StorageUnavailable(f"PostgreSQL at {describe(self._url)} is unavailable{reason}") from None
            except _REFUSED as e:
                raise StorageRefused(f"PostgreSQL refused the data: {error_text(e)}") from None
        raise AssertionError("unreachable")

    async def _load(self, doc_id: str) -> Optional[StoredDocument]:
        rows = await self._call("load", lambda: self._pool.runQuery(_LOAD, (MAX_CLOCK_ENTRIES, doc_id)))
        if not rows:
            return None
        state, clock, fields = rows[0]
        return stored_document(doc_id, read_json(state), clock, read_json(fields))

    def load(self, doc_id: str) -> "Deferred[Optional[StoredDocument]]":
        return Deferred.fromCoroutine(self._load(doc_id))

    def save(self, writes: Sequence[DocumentWrites]) -> "Deferred[dict[str, Text]]":
        return Deferred.fromCoroutine(self._save(writes))

    async def _save(self, writes: Sequence[DocumentWrites]) -> dict[str, Text]:
        #: per document with text: what the merge starts from, and the digest of its stored JSON
        bases = {doc.doc_id: _Base.of(doc.text_base) for doc in writes if doc.text is not None}
        for _ in range(TEXT_ATTEMPTS):
            merged = {doc.doc_id: bases[doc.doc_id].merged(doc.text) for doc in writes if doc.text is not None}
            # Documents in id order: concurrent saves lock their rows in one order, and so never deadlock.
            ordered = sorted(writes, key=lambda doc: doc.doc_id)
            records = [_record(doc, bases.get(doc.doc_id), merged.get(doc.doc_id)) for doc in ordered]
            try:
                await self._call("save", lambda: self._pool.runOperation("SELECT synckit_save(%s)", (_json(records),)))
                return merged
            except _TextChanged:
                for doc_id in bases:
                    bases[doc_id] = await self._load_text(doc_id)
        raise StorageUnavailable(f"text kept changing under {TEXT_ATTEMPTS} attempts to save it")

    async def _load_text(self, doc_id: str) -> "_Base":
        rows = await self._call("load_text", lambda: self._pool.runQuery(_LOAD_TEXT, (doc_id,)))
        if not rows or not rows[0][0]:
            return _Base(None, None)
        crdt, clock = rows[0]
        try:
            return _Base(Text(FugueText.parse(crdt), _text_clock(clock)), _digest(crdt))
        except TextStateError as e:
            raise StorageRefused(f"the stored text of {doc_id} cannot be read: {e}") from None

    def cleanup(self, deltas_before: float, tombstones_before: float) -> "Deferred[Cleaned]":
        return Deferred.fromCoroutine(self._cleanup(deltas_before, tombstones_before))

    async def _cleanup(self, deltas_before: float, tombstones_before: float) -> Cleaned:
        """
        Batches of L{CLEANUP_BATCH}, each its own transaction, until one comes back short.  The
        state is brought up to date first: a tombstone still pending has yet to remove its field
        from C{documents.state}, and is only collected once it has.
        """
        await self._sync_state()
        total = Cleaned(0, 0)
        arguments = (deltas_before, int(tombstones_before * 1000), CLEANUP_BATCH)
        while True:
            rows = await self._call("cleanup", lambda: self._pool.runQuery(_CLEANUP, arguments))
            deltas, documents, tombstones = rows[0]
            total = Cleaned(total.deltas + deltas, total.documents + documents)
            if max(deltas, tombstones) < CLEANUP_BATCH:
                return total

    def sync_state(self) -> "Deferred[int]":
        return Deferred.fromCoroutine(self._sync_state())

    async def _sync_state(self) -> int:
        """Batches of L{SYNC_BATCH} documents, each its own transaction, until one comes back short."""
        total = 0
        while True:
            rows = await self._call("sync_state", lambda: self._pool.runQuery(_SYNC_STATE, (SYNC_BATCH,)))
            total += rows[0][0]
            if rows[0][0] < SYNC_BATCH:
                return total

    def clear(self) -> Deferred:
        return Deferred.fromCoroutine(self._call("clear", lambda: self._pool.runOperation("DELETE FROM documents")))

    async def _ping(self) -> float:
        started = time.perf_counter()
        await self._call("ping", lambda: self._pool.runQuery("SELECT 1"))
        return time.perf_counter() - started

    def ping(self) -> "Deferred[float]":
        return Deferred.fromCoroutine(self._ping())


def error_text(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


class _TextChanged(Exception):
    """Another instance stored text since the merge began: read it and merge again."""


def _digest(crdt: str) -> str:
    """What ``synckit_save`` compares the stored text by: PostgreSQL's md5 of the JSON text."""
    return hashlib.md5(crdt.encode("utf-8")).hexdigest()


class _Base(NamedTuple):
    """Stored text a save merges into: the state (C{None}: none stored), and its stored JSON's digest."""

    text: Optional[Text]
    digest: Optional[str]

    @classmethod
    def of(cls, text: Optional[Text]) -> "_Base":
        """The text the server has confirmed, taken to be stored as we would write it."""
        return cls(text, _digest(text.state.to_json()) if text is not None else None)

    def merged(self, text: Text) -> Text:
        """C{text} merged into this (which stays as it was), the larger clock kept."""
        if self.text is None:
            return text
        state = self.text.state.copy()
        state.merge(text.state)
        return Text(state, max(self.text.clock, text.clock))


def _record(doc: DocumentWrites, base: Optional[_Base], text: Optional[Text]) -> dict[str, Any]:
    """One document of a save, as ``synckit_save`` takes it."""
    record: dict[str, Any] = {
        "id": doc.doc_id,
        "fields": [{"field": w.field, "value": w.value, "stamp": list(w.stamp)} for w in doc.fields],
        "ops": [
            {"writer": op.writer, "kind": op.kind, "operation": op.operation, "op": op.op, "counter": op.counter}
            for op in doc.ops
        ],
        "text": None,
    }
    if text is not None and base is not None:
        state = text.state.to_json()
        record["text"] = {"base": base.digest, "crdt": state, "content": text.state.text(), "clock": text.clock}
    return record


def read_json(text: Optional[str]) -> Any:
    """
    A stored JSON value, parsed as the wire parses what clients send, so that every value reads
    back as it was served before it was stored.  psycopg2's own reader would not: PostgreSQL keeps
    numbers as decimals (``1e20`` comes back ``100000000000000000000``) and psycopg2 makes Python
    integers of them, which no JSON encoder of ours can send past 64 bits; orjson reads them as the
    floats they were.  A number beyond a double's range, which no client of ours can send but a
    row written by hand can hold, reads as C{None} (JavaScript serves it as ``null``) rather than
    making the whole document unreadable.
    """
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_int=_number, parse_float=_number)


def _number(text: str) -> Any:
    """A JSON number as orjson would read it, and C{None} for one beyond a double's range."""
    digits = text.lstrip("-")
    if digits.isdigit() and len(digits) <= 20 and -(2**63) <= int(text) < 2**64:
        return int(text)
    value = float(text)
    return value if math.isfinite(value) else None


def _text_clock(value: Any) -> int:
    """A stored text clock: ours are integers, the reference's may be any JSON number."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def stored_document(doc_id: str, state: Any, clock: Any, rows: Any = None) -> StoredDocument:
    """
    Read a document written by us or by the reference.  C{state} (``documents.state``) is
    ``{"id", "fields"}`` for field documents and ``{"type": "text", "crdt", "clock"}`` for text,
    both in one object when both were written through us; C{rows} are our field rows (migration
    005), as L{_LOAD} gives them: their stamps, and the values of those written since the state
    was last brought up to date, which go over it.  Text that cannot be read is left out, and
    logged; it stays stored, and saves refuse to write over it.
    """
    state = state if isinstance(state, dict) else {}
    fields = state.get("fields")
    fields = dict(fields) if isinstance(fields, dict) else {}
    text = None
    if state.get("type") == "text" and state.get("crdt"):
        try:
            text = Text(FugueText.parse(state["crdt"]), _text_clock(state.get("clock")))
        except TextStateError as e:
            PostgresStorage._log.error("the stored text of {doc} cannot be read: {error}", doc=doc_id, error=e)
    stamps: dict[str, Stamp] = {}
    for name, ts, counter, writer, pending, deleted, value in rows or ():
        stamps[name] = (ts, counter, writer)
        if pending and deleted:
            fields.pop(name, None)
        elif pending:
            fields[name] = value
    counters = {str(k): int(v) for k, v in (clock or {}).items()}
    return StoredDocument(fields, counters, text, stamps)
