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


class StoredDocument(NamedTuple):
    """A document as storage holds it: visible fields, vector clock, text-CRDT state."""

    fields: dict[str, Any]
    clock: dict[str, int]
    text: Optional[tuple[str, float]]


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
        Persist C{writes}, applied in order to C{doc_id}: each sets or deletes its field and sets
        its writer's clock entry to its counter.  Fires once they are durable: the server
        acknowledges the message only then.
        """

    def save_text(doc_id: str, crdt: str, clock: float) -> Deferred:
        """Persist the document's text-CRDT state."""

    def clear() -> Deferred:
        """Delete every document (the test reset endpoint only)."""
