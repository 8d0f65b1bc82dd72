"""
What the sync engine needs from durable storage (PROTOCOL.md section 7.1), as Deferreds.

The reference issues three writes per field (whole document, writer's clock entry, delta log
row); we hand storage one message's writes at once, in order, so an implementation can make them
one transaction and the ``ack`` can wait for exactly that.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from synckit.sync.document import Stamp


class StorageUnavailable(Exception):
    """Storage cannot be reached now, or did not answer in time: the request may be retried later."""


class StorageRefused(Exception):
    """Storage cannot hold this data (say, a value PostgreSQL's JSONB rejects): retrying will not help."""


class StoredDocument(NamedTuple):
    """
    A document as storage holds it: visible fields, vector clock, text-CRDT state, and the
    last-writer-wins stamp of each field written through us (deleted ones included), so that
    instances re-reading it order its writes as they ordered them live.
    """

    fields: dict[str, Any]
    clock: dict[str, int]
    text: Optional[tuple[str, float]]
    stamps: dict[str, Stamp]


class FieldWrite(NamedTuple):
    """
    One applied field write: the authoritative value (the tombstone for a delete), who wrote it
    (a connection id), the writer's clock counter after it, and its stamp's time (ms).
    """

    field: str
    value: Any
    writer: str
    counter: int
    ts: int

    @property
    def stamp(self) -> Stamp:
        return (self.ts, self.counter, self.writer)


class IStorage(Interface):
    name = Attribute("Short name for logs and /health, e.g. 'memory'.")

    def start() -> Deferred:
        """Connect; fires when the storage can serve requests."""

    def stop() -> Deferred:
        """Disconnect after in-flight writes complete."""

    def load(doc_id: str) -> "Deferred[Optional[StoredDocument]]":
        """The stored document, or C{None} if it was never written."""

    def save_writes(doc_id: str, writes: Sequence[FieldWrite]) -> Deferred:
        """
        Persist C{writes} to C{doc_id}, each only if its stamp is newer than the one stored for
        its field (instances sharing storage may save concurrent writes in any order): it sets
        or deletes the field, and raises its writer's clock entry to its counter.  Fires once
        they are durable: the server acknowledges the message only then.
        """

    def ping() -> "Deferred[float]":
        """Round trip to the storage, in seconds; fails if it cannot be reached."""

    def save_text(doc_id: str, crdt: str, clock: float) -> Deferred:
        """Persist the document's text-CRDT state."""

    def clear() -> Deferred:
        """Delete every document (the test reset endpoint only)."""
