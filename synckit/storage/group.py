"""
Group commit: saves that arrive while storage is busy go to it together, as one transaction.

A durable write costs a transaction round trip whatever it holds, so under load the writes of
many connections are cheaper saved together.  Nothing waits on purpose: while fewer than
C{concurrency} saves are in flight a save goes at once (an idle server answers as fast as
without grouping); the ones that arrive meanwhile queue, and go as one group when a save ends.
Each caller is answered when its own writes are durable, with the text stored for its documents.

A group that storage refuses (data it cannot hold, such as a string PostgreSQL's JSONB rejects)
is saved again one caller at a time, so one client's bad value fails only its own write.  Any
other failure (storage down, a timeout) fails every write of the group: their outcome is the
group's.  Order is kept where it matters: a connection sends its next write only after the
previous one was answered, and last-writer-wins stamps, not arrival at storage, order writes.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from synckit.storage.interface import DocumentWrites, IStorage, StorageRefused
from synckit.sync.document import Text

class _Waiter(NamedTuple):
    writes: Sequence[DocumentWrites]
    done: Deferred
    #: to be saved in a transaction of its own (its group was refused)
    alone: bool = False


class GroupCommit:
    def __init__(self, storage: IStorage, concurrency: int = 1, group_size: int = 500) -> None:
        """
        @param concurrency: saves in flight at once (PostgreSQL: its pool's connections).
        @param group_size: the most callers in one group, bounding one transaction's size.
        """
        self._storage = storage
        self._concurrency = concurrency
        self._group_size = group_size
        self._in_flight = 0
        self._queue: list[_Waiter] = []

    def save(self, writes: Sequence[DocumentWrites]) -> "Deferred[dict[str, Text]]":
        """Save C{writes} in one transaction, alone or with others': see L{IStorage.save}."""
        if self._in_flight < self._concurrency and not self._queue:
            # Nothing to group with: storage's own answer is the caller's.
            self._in_flight += 1
            return self._storage.save(writes).addBoth(self._alone_done)
        d: Deferred = Deferred()
        self._queue.append(_Waiter(writes, d))
        self._next()
        return d

    def _alone_done(self, result: Any) -> Any:
        self._in_flight -= 1
        self._next()
        return result

    def _next(self) -> None:
        """Send the next group, if any waits and a save may start."""
        if not self._queue or self._in_flight >= self._concurrency:
            return
        size = 1 if self._queue[0].alone else self._group_size
        group, self._queue = self._queue[:size], self._queue[size:]
        self._in_flight += 1
        saving = self._storage.save(combined([w.writes for w in group]))
        saving.addBoth(self._done, group)

    def _done(self, result: "dict[str, Text] | Failure", group: list[_Waiter]) -> None:
        self._in_flight -= 1
        if isinstance(result, Failure) and result.check(StorageRefused) and len(group) > 1:
            # One caller's data is refused: each goes again on its own, ahead of the queue.
            self._queue[:0] = [w._replace(alone=True) for w in group]
        else:
            for writes, d, _ in group:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback({doc.doc_id: result[doc.doc_id] for doc in writes if doc.doc_id in result})
        self._next()


def combined(groups: list[Sequence[DocumentWrites]]) -> list[DocumentWrites]:
    """
    Several callers' writes as one save: one entry per document, its field writes and ops in
    arrival order, its text states merged (into a copy: each caller's stays as it was).
    """
    if len(groups) == 1:
        return list(groups[0])
    by_doc: dict[str, DocumentWrites] = {}
    copied: set[str] = set()  # documents whose combined text is a copy of our own
    for writes in groups:
        for doc in writes:
            known = by_doc.get(doc.doc_id)
            if known is None:
                by_doc[doc.doc_id] = doc
                continue
            if known.text is not None and doc.text is not None and doc.doc_id not in copied:
                known = known._replace(text=Text(known.text.state.copy(), known.text.clock))
                copied.add(doc.doc_id)
            by_doc[doc.doc_id] = _merged(known, doc)
    return list(by_doc.values())


def _merged(a: DocumentWrites, b: DocumentWrites) -> DocumentWrites:
    """C{b} after C{a}; C{a}'s text, if both have one, is merged into (the caller made it a copy)."""
    text: Optional[Text] = a.text or b.text
    if a.text is not None and b.text is not None:
        a.text.state.merge(b.text.state)
        text = Text(a.text.state, max(a.text.clock, b.text.clock))
    return DocumentWrites(
        a.doc_id, [*a.fields, *b.fields], text, [*a.ops, *b.ops], b.text_base if b.text is not None else a.text_base
    )
