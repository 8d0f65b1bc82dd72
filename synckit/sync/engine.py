"""
The sync engine: documents, their subscribers, presence, and the one path every write takes.

A write is saved before anyone can see it:

    handler validates -> L{SyncEngine.write}: stamp (nothing visible changes)
        -> storage.save (one transaction: fields, text merged into the stored text, op log)
        -> merge into the cached document (the merge remote writes use) -> broadcast, relay,
           publish to other instances -> the handler acknowledges

A save that fails leaves the cache as it was and the client gets an error.  A save that times out
has an unknown outcome: its documents are marked stale and re-read from storage before they are
served again, and once more when the save really ends, so whatever it did is shown and nothing is
undone by guess.

Other instances' publications, and storage re-reads after an outage, go through the same merges
(L{Document.merge}, L{Document.merge_text}): last-writer-wins stamps for fields, the Fugue merge
for text, both commutative, so every instance converges whatever order things arrive in.

Counter, set and rich-text operations are not applied here (their state lives in the clients'
CRDTs): they are logged with the save, then relayed to every other subscriber and instance.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, ContextManager, Hashable, Iterable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from synckit.metrics import Metrics
from synckit.pubsub.interface import IPubSub, PubSubUnavailable
from synckit.pubsub.watches import Watches
from synckit.storage.group import GroupCommit
from synckit.storage.interface import (
    DocumentWrites,
    FieldWrite,
    IStorage,
    OpRecord,
    StorageTimeout,
    StorageUnavailable,
    StoredDocument,
)
from synckit.sync.awareness import Awareness
from synckit.sync.broadcast import Broadcaster, deliver
from synckit.sync.document import TOMBSTONE, Document, Stamp, Text, is_tombstone
from synckit.sync.fugue import FugueText, TextStateError
from synckit.sync.registry import DocumentRegistry
from synckit.tasks import BackgroundTasks
from synckit.wire import Frame, MessageIds

#: seconds between attempts to re-read a document that storage could not serve (a minute in all)
RESYNC_BACKOFF = (0.5, 1, 2, 4, 8, 15, 30)


class Subscriber(Protocol):
    """A connection as the engine sees it."""

    id: str
    authenticated: bool
    subscriptions: set[str]
    awareness: set[str]

    def send(self, frame: Frame) -> None: ...


@dataclass
class Changes:
    """
    What one message writes to one document, validated by its handler.

    @ivar fields: field writes in order; a delete's value is the tombstone.
    @ivar text: the message's text states merged together, to merge into the stored text.
    @ivar text_clock: the text clock they bring (ms).
    @ivar text_ops: text ops to relay: ``text-state`` ops get the merged state once saved,
        legacy ``text`` ops go as they came.
    @ivar ops: (kind, operation, op) of counter, set and rich-text ops, relayed as they came.
    @ivar clocks: vector clocks the client sent with the message and its ops.
    """

    fields: list[tuple[str, Any]] = field(default_factory=list)
    text: Optional[FugueText] = None
    text_clock: int = 0
    text_ops: list[dict[str, Any]] = field(default_factory=list)
    ops: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    clocks: list[Any] = field(default_factory=list)
    last_modified: Any = None

    def add_text(self, state: FugueText, clock: int) -> None:
        if self.text is None:
            self.text = state
        else:
            self.text.merge(state)
        self.text_clock = max(self.text_clock, clock)


class SyncEngine:
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        storage: IStorage,
        pubsub: IPubSub,
        metrics: Metrics,
        ids: MessageIds,
        tasks: BackgroundTasks,
        cache_size: int = 1000,
        awareness_timeout: int = 30_000,
        save_concurrency: int = 1,
        output: ContextManager[Any] = nullcontext(),
    ) -> None:
        """
        @param save_concurrency: saves in flight at once; the writes that arrive meanwhile are
            saved together (L{GroupCommit}).
        @param output: entered around each broadcast flush, so that each subscriber's frames
            leave together (L{synckit.output.OutputBatch}).
        """
        self.clock = clock
        self.storage = storage
        self._saves = GroupCommit(storage, save_concurrency)
        self.pubsub = pubsub
        self.metrics = metrics
        self.ids = ids
        self.tasks = tasks
        self.watches = Watches(pubsub)
        self.registry = DocumentRegistry(storage, self.watches, self._merge_stored, cache_size)
        self.broadcaster = Broadcaster(clock, self.registry, ids, metrics, output)
        self.awareness = Awareness(awareness_timeout)

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def cached_text(self, doc_id: str) -> Optional[FugueText]:
        """
        The document's text if it is cached here: a text state written to it is read like it
        (L{FugueText.parse}), as clients send their whole state, mostly the document's.
        """
        doc = self.registry.peek(doc_id)
        return doc.text.state if doc is not None and doc.text is not None else None

    # Reading and subscribing

    def open(self, doc_id: str) -> "Deferred[Document]":
        """The document as storage has confirmed it (loaded, or re-read if stale, first)."""
        return self.registry.open(doc_id)

    def subscribe(self, doc_id: str, subscriber: Subscriber) -> None:
        subscriber.subscriptions.add(doc_id)
        self.registry.subscribe(doc_id, subscriber)

    def unsubscribe(self, doc_id: str, subscriber: Subscriber) -> None:
        """Stop sending C{doc_id}'s changes to C{subscriber}; its presence there ends too."""
        subscriber.subscriptions.discard(doc_id)
        self.registry.unsubscribe(doc_id, subscriber)
        self._leave_presence(subscriber, [doc_id])

    def forget(self, subscriber: Subscriber) -> None:
        """A connection closed: drop its subscriptions and end the presence it published."""
        for doc_id in subscriber.subscriptions:
            self.registry.unsubscribe(doc_id, subscriber)
        self.awareness.unsubscribe_all(subscriber, subscriber.awareness)
        for doc_id in subscriber.awareness:
            self.watches.unwatch(doc_id)
        self._leave_presence(subscriber, None)

    # Writing

    async def write(self, writer: Subscriber, changes: dict[str, Changes], since: float) -> None:
        """
        Save C{changes} (document id -> what to write there) in one transaction, then show
        them.  Fires once they are durable and visible; fails with storage's error, with
        nothing shown, otherwise.  C{since} is when the message arrived (perf_counter).
        """
        docs = {}
        for doc_id in changes:
            doc = self.registry.peek(doc_id)
            docs[doc_id] = doc if doc is not None and not doc.stale else await self.open(doc_id)
        now = self.now_ms()
        batch = [self._stamped(docs[doc_id], writer.id, change, now) for doc_id, change in changes.items()]
        try:
            saved = await self._saves.save(batch)
        except StorageTimeout as e:
            self._unknown(list(docs.values()), e.settled)
            raise
        finally:
            for doc_writes in batch:
                doc = docs[doc_writes.doc_id]
                for w in doc_writes.fields:
                    doc.settle(w.field, w.stamp)
        for doc_writes in batch:
            doc = docs[doc_writes.doc_id]
            change = changes[doc.id]
            self._show_local(doc, doc_writes, change, saved.get(doc.id), writer, since)

    def _stamped(self, doc: Document, writer: str, change: Changes, now: int) -> DocumentWrites:
        """The storage writes for C{change}: stamped, but nothing visible changes yet."""
        counter = doc.clock.get(writer, 0)
        fields = []
        for name, value in change.fields:
            counter += 1
            ts = doc.stamp(name, writer, counter, now)[0]
            fields.append(FieldWrite(name, TOMBSTONE if is_tombstone(value) else value, writer, counter, ts))
        text = Text(change.text, change.text_clock or now) if change.text is not None else None
        ops = [OpRecord(kind, operation, writer, counter, op) for kind, operation, op in change.ops]
        return DocumentWrites(doc.id, fields, text, ops, doc.text if text is not None else None)

    def _show_local(
        self, doc: Document, saved: DocumentWrites, change: Changes, text: Optional[Text], writer: Subscriber, since: float
    ) -> None:
        """Merge a saved write into the cache, send it to the others here, and publish it."""
        writes = [(w.field, w.value, w.stamp) for w in saved.fields]
        if writes:
            doc.clock[writer.id] = max(doc.clock.get(writer.id, 0), saved.fields[-1].counter)
        for clock in change.clocks:
            doc.merge_clock(clock)
        if change.last_modified is not None:
            doc.last_modified = change.last_modified
        self._show(doc, writes, since)
        payload: dict[str, Any] = {"writes": [list(w) for w in saved.fields], "clock": dict(doc.clock)}
        if text is not None:
            doc.merge_text(text)
            assert doc.text is not None
            state = doc.text.state.to_json()
            payload["text"] = [state, doc.text.clock]
        else:
            state = None
        if change.text_ops:
            relays = [self._text_relay(op, state, writer.id) for op in change.text_ops]
            self._relay(doc.id, relays, True, writer)
            payload["textOps"] = relays
            self.metrics.operations.inc("text", sum(1 for op in change.text_ops if op.get("type") == "text"))
        if change.ops:
            ops = [op for _, _, op in change.ops]
            self._relay(doc.id, ops, False, writer)
            payload["ops"] = ops
            for kind, _, _ in change.ops:
                self.metrics.operations.inc(kind)
        self._publish("delta", doc.id, payload)

    @staticmethod
    def _text_relay(op: dict[str, Any], state: Optional[str], writer: str) -> dict[str, Any]:
        """A text op as relayed: a ``text-state`` op carries the merged state, every op a client id."""
        relay = {**op, "clientId": op.get("clientId") or writer}
        if state is not None and op.get("type") == "text-state":
            relay["state"] = state
        return relay

    def _relay(self, doc_id: str, ops: list[dict[str, Any]], text: bool, exclude: Optional[Subscriber]) -> None:
        """
        Send ops at once to the document's subscribers here, but C{exclude}: these are not
        idempotent (a counter step applied twice counts twice), so never back to their sender.
        """
        now = self.now_ms()
        body: dict[str, Any] = {"id": self.ids(now), "documentId": doc_id, "deltas": ops}
        if text:
            body["isTextOperation"] = True
        self.deliver(Frame("delta_batch", now, body), self.registry.subscribers(doc_id), exclude)

    def _show(self, doc: Document, writes: Iterable[tuple[str, Any, Stamp]], since: float) -> None:
        """Merge confirmed field writes into a cached document and broadcast those that won."""
        changed = [name for name, value, stamp in writes if doc.merge(name, value, stamp)]
        if changed:
            self.broadcaster.queue(doc.id, changed, since)

    def _unknown(self, docs: list[Document], settled: Deferred) -> None:
        """
        A save timed out: what it wrote may be in storage or not.  Until the documents are
        re-read they are stale (L{DocumentRegistry.open} re-reads them first); and they are
        re-read once more when the save really ends, in case it committed after that.
        """
        for doc in docs:
            doc.stale = True

        def reread(_: None) -> None:
            for doc in docs:
                self._resync_later(doc)

        settled.addCallback(reread)

    # Other instances and storage

    def _publish(self, kind: str, doc_id: str, payload: dict[str, Any]) -> None:
        """
        Tell the other instances, in the background.  While pub/sub is down the publication is
        lost (pub/sub logs the outage once, and the others resync from storage when it is back).
        """
        d = self.pubsub.publish(kind, doc_id, payload)
        if d.called and d.result is None:
            return  # done already (the in-process bus): nothing to wait for or log
        d.addErrback(lambda f: f.trap(PubSubUnavailable) and None)
        self.tasks.add(d, f"publishing {kind}")

    def receive_remote(self, kind: str, doc_id: str, payload: dict[str, Any]) -> None:
        """Another instance's publication: merge it, and send what changed to subscribers here."""
        if kind == "awareness":
            user = payload.get("userId")
            self._show_presence(doc_id, payload["clientId"], payload["state"], payload["clock"], None, user)
            return
        ops = payload.get("ops")
        if ops:
            self._relay(doc_id, ops, False, None)
        doc = self.registry.peek(doc_id)
        if doc is None:
            return  # not cached here: it will be read from storage when it is next opened
        writes = ((name, value, (ts, counter, writer)) for name, value, writer, counter, ts in payload["writes"])
        self._show(doc, writes, perf_counter())
        doc.merge_clock(payload["clock"])
        text = payload.get("text")
        changed = False
        if text is not None:
            try:
                state = FugueText.parse(text[0], like=self.cached_text(doc_id))
            except TextStateError as e:
                self._log.warn("dropped unreadable text of {doc} from another instance: {error}", doc=doc_id, error=e)
            else:
                changed = doc.merge_text(Text(state, int(text[1])))
        relays = payload.get("textOps")
        if relays or changed:
            self._relay(doc_id, relays or [self._server_text_op(doc)], True, None)

    def _server_text_op(self, doc: Document) -> dict[str, Any]:
        """A ``text-state`` op carrying the document's whole text, as the server sends it."""
        assert doc.text is not None
        return {
            "type": "text-state",
            "documentId": doc.id,
            "state": doc.text.state.to_json(),
            "clientId": "server",
            "timestamp": doc.text.clock,
            "clock": doc.clock,
        }

    def _merge_stored(self, doc: Document, stored: StoredDocument) -> None:
        """Merge what storage holds into a cached document, and send subscribers what changed."""
        writes = ((name, stored.fields.get(name, TOMBSTONE), stamp) for name, stamp in stored.stamps.items())
        self._show(doc, writes, perf_counter())
        doc.merge_clock(stored.clock)
        if stored.text is not None and doc.merge_text(stored.text):
            self._relay(doc.id, [self._server_text_op(doc)], True, None)

    def resync(self) -> None:
        """
        Re-read every cached document from storage and merge what other instances saved, after
        pub/sub may have lost their publications (a reconnect).
        """
        for doc in list(self.registry.documents()):
            self._resync_later(doc)

    def _resync_later(self, doc: Document) -> None:
        self.tasks.add(Deferred.fromCoroutine(self._resync(doc)), f"resyncing {doc.id}")

    async def _resync(self, doc: Document) -> None:
        for delay in (*RESYNC_BACKOFF, None):
            try:
                stored = await self.storage.load(doc.id)
                break
            except StorageUnavailable:
                if delay is None:
                    self._log.warn("could not resync {doc}: storage stayed unavailable", doc=doc.id)
                    return
                await deferLater(self.clock, delay, lambda: None)
        if stored is not None:
            self._merge_stored(doc, stored)
        doc.stale = False

    # Presence

    def subscribe_awareness(self, subscriber: Subscriber, doc_id: str) -> list[dict[str, Any]]:
        """Add a presence subscriber; other instances' presence updates for the document now come here."""
        if doc_id not in subscriber.awareness:
            subscriber.awareness.add(doc_id)
            self.watches.watch(doc_id)
        return self.awareness.subscribe(doc_id, subscriber)

    def update_awareness(
        self,
        subscriber: Subscriber,
        user: str,
        doc_id: str,
        client_id: str,
        state: Any,
        clock: Any,
        per_document: int,
        per_connection: int,
    ) -> None:
        """
        A connection publishes presence: it lasts as long as that connection (or until it
        publishes C{None}), and the connection hears the others' presence from now on, as if it
        had subscribed (clients do not subscribe again after a reconnect).

        @raise PresenceLimit: the client id's presence is another user's, or a new state would
            be one more than C{per_document} client ids on the document or C{per_connection}
            published by this connection; nothing changes.
        """
        self.awareness.admit(doc_id, client_id, subscriber, user, state, per_document, per_connection)
        if doc_id not in subscriber.awareness:
            now = self.now_ms()
            states = [s for s in self.subscribe_awareness(subscriber, doc_id) if s["clientId"] != client_id]
            if states:
                subscriber.send(
                    Frame("awareness_state", now, {"id": self.ids(now), "documentId": doc_id, "states": states})
                )
        self._show_presence(doc_id, client_id, state, clock, subscriber, user)
        self._publish("awareness", doc_id, {"clientId": client_id, "state": state, "clock": clock, "userId": user})

    def _show_presence(
        self, doc_id: str, client_id: str, state: Any, clock: Any, owner: Optional[Hashable], user: Optional[str] = None
    ) -> None:
        now = self.now_ms()
        subscribers = self.awareness.update(doc_id, client_id, state, clock, now, owner, user)
        body = {"id": self.ids(now), "documentId": doc_id, "clientId": client_id, "state": state, "clock": clock}
        self.deliver(Frame("awareness_update", now, body), subscribers)

    def _leave_presence(self, owner: Hashable, doc_ids: Optional[Sequence[str]]) -> None:
        """End the presence C{owner} published (on C{doc_ids}, or everywhere): others get C{None}."""
        for doc_id, client_id in self.awareness.owned(owner, doc_ids):
            self._show_presence(doc_id, client_id, None, self.now_ms(), None)
            self._publish("awareness", doc_id, {"clientId": client_id, "state": None, "clock": self.now_ms()})

    def housekeeping(self) -> None:
        """
        Expire presence from other instances that stopped refreshing it (an instance gone
        without a word), and refresh our own connections' presence on the other instances.
        """
        now = self.now_ms()
        for doc_id, client_id, subscribers in self.awareness.expire(now):
            body = {"id": self.ids(now), "documentId": doc_id, "clientId": client_id, "state": None, "clock": now}
            self.deliver(Frame("awareness_update", now, body), subscribers)
        for doc_id, client_id, p in self.awareness.refresh(now):
            self._publish("awareness", doc_id, {"clientId": client_id, "state": p.state, "clock": p.clock, "userId": p.user})

    # Sending and housekeeping

    def deliver(self, frame: Frame, recipients: Iterable[Subscriber], exclude: Optional[Subscriber] = None) -> None:
        """Send one frame to every authenticated recipient but C{exclude}, and count it."""
        self.metrics.sent.inc(frame.type, deliver(frame, recipients, exclude))

    async def clear(self) -> None:
        """Forget every document and presence state (the test reset endpoint)."""
        self.awareness.clear()
        await self.registry.clear()
