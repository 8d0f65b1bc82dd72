"""
What the sync engine needs from durable storage, as Deferreds.

A write is saved before anyone can see it: the engine hands storage everything one message (or
one group of messages) writes, storage makes it durable in one transaction, and only then does
the engine show it to readers, broadcast it and acknowledge it.  The reference issues three
writes per field (whole document, writer's clock entry, delta log row) and acknowledges before
they finish; here the ``ack`` waits for exactly that one transaction.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from synckit.sync.document import Stamp, Text


class StorageUnavailable(Exception):
    """Storage cannot be reached now: nothing was saved, and the request may be retried later."""


class StorageTimeout(StorageUnavailable):
    """
    Storage did not answer in time.  Unlike a plain L{StorageUnavailable}, what was asked may
    still happen: C{settled} fires (with C{None}, never failing) once the call has really ended,
    so that the caller can re-read what storage then holds instead of guessing.
    """

    def __init__(self, message: str, settled: Deferred) -> None:
        super().__init__(message)
        self.settled = settled


class StorageRefused(Exception):
    """Storage cannot hold this data (say, a value PostgreSQL's JSONB rejects): retrying will not help."""


class StoredDocument(NamedTuple):
    """
    A document as storage holds it: visible fields, vector clock, text CRDT state, and the
    last-writer-wins stamp of each field written through us (deleted ones included), so that
    instances re-reading it order its writes as they ordered them live.
    """

    fields: dict[str, Any]
    clock: dict[str, int]
    text: Optional[Text]
    stamps: dict[str, Stamp]


class FieldWrite(NamedTuple):
    """
    One field write: the authoritative value (the tombstone for a delete), who wrote it (a
    connection id), the writer's clock counter after it, and its stamp's time (ms).
    """

    field: str
    value: Any
    writer: str
    counter: int
    ts: int

    @property
    def stamp(self) -> Stamp:
        return (self.ts, self.counter, self.writer)


class OpRecord(NamedTuple):
    """
    An operation the server relays without applying (a counter step, a set change, a rich-text
    format): kept in the delta log as C{kind} (``counter``, ``set``, ``richtext``), C{operation}
    (``increment``, ``add``, ``format``, ...) and the op as relayed.
    """

    kind: str
    operation: str
    writer: str
    counter: int
    op: dict[str, Any]


class DocumentWrites(NamedTuple):
    """
    Everything one save writes to one document: field writes in order, text state to merge into
    the stored text (C{None}: no text), and operations for the delta log.  C{text_base} is the
    text as the server last had it confirmed, which storage may take as the stored text until it
    finds otherwise (it must not change it).
    """

    doc_id: str
    fields: Sequence[FieldWrite] = ()
    text: Optional[Text] = None
    ops: Sequence[OpRecord] = ()
    text_base: Optional[Text] = None


class Cleaned(NamedTuple):
    """What one cleanup forgot: delta log rows, and documents whose old tombstones were collected."""

    deltas: int
    documents: int


class IStorage(Interface):
    name = Attribute("Short name for logs and /health, e.g. 'memory'.")

    def start() -> Deferred:
        """Connect; fires when the storage can serve requests."""

    def stop() -> Deferred:
        """Disconnect after in-flight writes complete."""

    def load(doc_id: str) -> "Deferred[Optional[StoredDocument]]":
        """
        The stored document, or C{None} if it was never written.  Its clock holds at most
        L{synckit.sync.document.MAX_CLOCK_ENTRIES} entries, the most recently raised ones: every
        connection that ever wrote the document has an entry, and the clock goes with every
        message about it.
        """

    def save(writes: Sequence[DocumentWrites]) -> "Deferred[dict[str, Text]]":
        """
        Persist C{writes}, all in one transaction, and fire once they are durable.

        - A field write is kept only if its stamp is newer than the one stored for its field
          (instances sharing storage may save concurrent writes in any order); it sets or deletes
          the field, and raises its writer's clock entry to its counter.
        - Text state is merged into the stored text under the transaction's lock on the
          document, never written over it, so concurrent saves from any number of instances all
          keep their edits; the stored text clock becomes the larger of the two.
        - Operations are appended to the delta log.

        @return: for each document that had text, the text as now stored (a fresh object the
            caller owns).
        @raise StorageUnavailable: nothing was saved (L{StorageTimeout}: the outcome is unknown).
        @raise StorageRefused: the data cannot be stored; nothing was saved.
        """

    def cleanup(deltas_before: float, tombstones_before: float) -> "Deferred[Cleaned]":
        """
        Forget what the data lifecycle lets go (docs/data-lifecycle.md): delta log entries
        logged before C{deltas_before}, and the stamps of deleted fields stamped before
        C{tombstones_before} (both POSIX seconds).  Visible fields and their stamps are kept.
        Saves may run meanwhile; a document being saved may be left for the next cleanup.

        @raise StorageUnavailable: as for L{save}; what was forgotten before stays forgotten.
        """

    def sync_state() -> "Deferred[int]":
        """
        Bring the copy of every document that other programs read (PostgreSQL's
        ``documents.state``, in the reference server's shape) up to date with the writes saved
        since, and fire with how many documents changed.  Saves only write what they change and
        leave this copy behind; the service calls this every ``state-sync-interval``.  Loads never
        depend on it.

        @raise StorageUnavailable: as for L{save}; what was brought up to date stays so.
        """

    def ping() -> "Deferred[float]":
        """Round trip to the storage, in seconds; fails if it cannot be reached."""

    def clear() -> Deferred:
        """Delete every document (the test reset endpoint only)."""
