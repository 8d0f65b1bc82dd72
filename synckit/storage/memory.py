"""
Storage in this process's memory: the default, and the reference for the storage contract.

Nothing survives a restart.  The delta audit log that SQL storage keeps is not kept here: nothing
reads it, and in memory it would only grow.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from synckit.storage.interface import FieldWrite, IStorage, StoredDocument
from synckit.sync.document import Stamp, is_tombstone


@implementer(IStorage)
class MemoryStorage:
    name = "memory"

    def __init__(self) -> None:
        self._fields: dict[str, dict[str, Any]] = {}
        self._clocks: dict[str, dict[str, int]] = {}
        self._stamps: dict[str, dict[str, Stamp]] = {}
        self._text: dict[str, tuple[str, float]] = {}

    def start(self) -> Deferred:
        return succeed(None)

    def stop(self) -> Deferred:
        return succeed(None)

    def load(self, doc_id: str) -> "Deferred[Optional[StoredDocument]]":
        if doc_id not in self._fields and doc_id not in self._text:
            return succeed(None)
        return succeed(
            StoredDocument(
                dict(self._fields.get(doc_id, {})),
                dict(self._clocks.get(doc_id, {})),
                self._text.get(doc_id),
                dict(self._stamps.get(doc_id, {})),
            )
        )

    def save_writes(self, doc_id: str, writes: Sequence[FieldWrite]) -> Deferred:
        stored = self._fields.setdefault(doc_id, {})
        clock = self._clocks.setdefault(doc_id, {})
        stamps = self._stamps.setdefault(doc_id, {})
        for write in writes:
            clock[write.writer] = max(clock.get(write.writer, 0), write.counter)
            previous = stamps.get(write.field)
            if previous is not None and previous >= write.stamp:
                continue
            stamps[write.field] = write.stamp
            if is_tombstone(write.value):
                stored.pop(write.field, None)
            else:
                stored[write.field] = write.value
        return succeed(None)

    def ping(self) -> "Deferred[float]":
        return succeed(0.0)

    def save_text(self, doc_id: str, crdt: str, clock: float) -> Deferred:
        self._text[doc_id] = (crdt, clock)
        return succeed(None)

    def clear(self) -> Deferred:
        self._fields.clear()
        self._clocks.clear()
        self._stamps.clear()
        self._text.clear()
        return succeed(None)
