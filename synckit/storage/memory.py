"""
Storage in this process's memory: the default, and the reference for the storage contract.

Nothing survives a restart.  The delta log that SQL storage keeps is not kept here: nothing reads
it, and in memory it would only grow.  Stored text is an object of its own that only copies
leave, so that nothing outside can ever change what is stored.  Each document's clock is kept in
the order its entries were last raised, so that a load gives the most recent ones.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from synckit.storage.interface import Cleaned, DocumentWrites, IStorage, StoredDocument
from synckit.sync.document import MAX_CLOCK_ENTRIES, Stamp, Text, collect_tombstones, is_tombstone


@implementer(IStorage)
class MemoryStorage:
    name = "memory"

    def __init__(self) -> None:
        self._fields: dict[str, dict[str, Any]] = {}
        self._clocks: dict[str, dict[str, int]] = {}
        self._stamps: dict[str, dict[str, Stamp]] = {}
        self._text: dict[str, Text] = {}

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        return succeed(None)

    def load(self, doc_id: str) -> "Deferred[Optional[StoredDocument]]":
        if doc_id not in self._fields and doc_id not in self._text:
            return succeed(None)
        text = self._text.get(doc_id)
        return succeed(
            StoredDocument(
                dict(self._fields.get(doc_id, {})),
                dict(list(self._clocks.get(doc_id, {}).items())[-MAX_CLOCK_ENTRIES:]),
                Text(text.state.copy(), text.clock) if text is not None else None,
                dict(self._stamps.get(doc_id, {})),
            )
        )

    def save(self, writes: Sequence[DocumentWrites]) -> "Deferred[dict[str, Text]]":
        saved = {}
        for doc in writes:
            self._save_fields(doc)
            if doc.text is not None:
                saved[doc.doc_id] = self._merge_text(doc.doc_id, doc.text)
        return succeed(saved)

    def _merge_text(self, doc_id: str, text: Text) -> Text:
        stored = self._text.get(doc_id)
        if stored is None:
            stored = self._text[doc_id] = Text(text.state.copy(), text.clock)
        else:
            stored.state.merge(text.state)
            if text.clock > stored.clock:
                stored = self._text[doc_id] = Text(stored.state, text.clock)
        return Text(stored.state.copy(), stored.clock)

    def _save_fields(self, doc: DocumentWrites) -> None:
        if not doc.fields:
            return
        stored = self._fields.setdefault(doc.doc_id, {})
        clock = self._clocks.setdefault(doc.doc_id, {})
        stamps = self._stamps.setdefault(doc.doc_id, {})
        for write in doc.fields:
            clock[write.writer] = max(clock.pop(write.writer, 0), write.counter)
            previous = stamps.get(write.field)
            if previous is not None and previous >= write.stamp:
                continue
            stamps[write.field] = write.stamp
            if is_tombstone(write.value):
                stored.pop(write.field, None)
            else:
                stored[write.field] = write.value

    def cleanup(self, deltas_before: float, tombstones_before: float) -> "Deferred[Cleaned]":
        cutoff = tombstones_before * 1000
        documents = sum(
            bool(collect_tombstones(stamps, self._fields.get(doc_id, {}), cutoff)) for doc_id, stamps in self._stamps.items()
        )
        return succeed(Cleaned(0, documents))

    def sync_state(self) -> "Deferred[int]":
        return succeed(0)  # nothing here is read by another program

    def ping(self) -> "Deferred[float]":
        return succeed(0.0)

    def clear(self) -> Deferred:
        self._fields.clear()
        self._clocks.clear()
        self._stamps.clear()
        self._text.clear()
        return succeed(None)
