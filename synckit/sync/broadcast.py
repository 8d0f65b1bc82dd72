"""
Broadcast batching.

Written fields are queued per document, each once, in the order they were first written; the
value sent is the field's value at flush time (the tombstone if it is gone), so a field written
twice goes out once with its latest value, and writes that finish out of order (storage answers
in any order) can never make a stale value overtake a newer one.  The reference flushes 50 ms after the first queued
write; we flush at the end of the current reactor turn instead, so writes that arrive together
still go out together but a lone write is never held back.  Each flushed field becomes one
``delta`` frame, encoded once and sent to every authenticated subscriber, the writer included,
in the same order for all of them.
"""

from __future__ import annotations

from contextlib import nullcontext
from time import perf_counter
from typing import Any, ContextManager, Iterable, Optional, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from synckit.metrics import Metrics
from synckit.sync.document import TOMBSTONE, Document
from synckit.sync.registry import DocumentRegistry
from synckit.wire import Frame, MessageIds


class Recipient(Protocol):
    authenticated: bool

    def send(self, frame: Frame) -> None: ...


def deliver(frame: Frame, recipients: Iterable[Recipient], exclude: Optional[Recipient] = None) -> int:
    """Send one frame to every authenticated recipient but C{exclude}; return how many got it."""
    sent = 0
    for recipient in recipients:
        if recipient.authenticated and recipient is not exclude:
            recipient.send(frame)
            sent += 1
    return sent


def field_delta(doc: Document, field: str, ids: MessageIds, now: int) -> Frame:
    """
    A field's current value as one ``delta`` message (the tombstone once it is deleted), with
    the document's clock as it stands: the caller raises it (L{Document.served_clock}) once
    for the values it sends together.
    """
    return Frame(
        "delta",
        now,
        {
            "id": ids(now),
            "documentId": doc.id,
            "field": field,
            "value": doc.fields.get(field, TOMBSTONE),
            "clock": doc.clock,
            "clientId": "server",
        },
    )


class Broadcaster:
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        registry: DocumentRegistry,
        ids: MessageIds,
        metrics: Metrics,
        output: ContextManager[Any] = nullcontext(),
    ) -> None:
        self._clock = clock
        self._output = output
        self._registry = registry
        self._ids = ids
        self._metrics = metrics
        self._pending: dict[str, dict[str, None]] = {}
        #: per queued document, when (perf_counter) its earliest pending write arrived
        self._since: dict[str, float] = {}
        self._call: Optional[IDelayedCall] = None

    def queue(self, doc_id: str, fields: Iterable[str], since: float) -> None:
        """Queue C{fields} of C{doc_id} for broadcast; C{since} is when their write arrived."""
        batch = self._pending.get(doc_id)
        if batch is None:
            batch = self._pending[doc_id] = {}
            self._since[doc_id] = since
        batch.update(dict.fromkeys(fields))
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send everything queued now (also called at shutdown, before sockets close)."""
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        pending, self._pending = self._pending, {}
        since, self._since = self._since, {}
        now = int(self._clock.seconds() * 1000)
        with self._output:
            for doc_id, batch in pending.items():
                try:
                    self._send(doc_id, batch, now)
                    self._metrics.broadcast_delay.observe(perf_counter() - since[doc_id])
                except Exception:
                    # One document's failure must not cost the others their broadcasts.
                    self._log.failure("broadcasting {doc} failed", doc=doc_id)

    def _send(self, doc_id: str, batch: dict[str, None], now: int) -> None:
        doc = self._registry.peek(doc_id)
        recipients = [s for s in self._registry.subscribers(doc_id) if s.authenticated]
        if doc is None or not recipients:
            return
        doc.served_clock(now)
        for field in batch:
            frame = field_delta(doc, field, self._ids, now)
            for recipient in recipients:
                recipient.send(frame)
        self._metrics.fanout.observe(len(recipients))
        self._metrics.sent.inc("delta", len(recipients) * len(batch))
