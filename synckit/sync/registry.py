"""
The document registry: which documents are cached, and which connections subscribe to each.

Documents load lazily from storage and stay cached, least recently used first out, up to a bound.
A document with subscribers is never evicted.  Concurrent opens of a document that is still
loading share one load, so every connection sees the same object.  A cached document marked stale
(storage may hold writes it lacks) is re-read, and what storage holds merged into it, before it
is served again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Iterator, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from synckit.pubsub.watches import Watches
from synckit.storage.interface import IStorage, StorageUnavailable, StoredDocument
from synckit.sync.document import Document


class DocumentRegistry:
    _log = Logger()

    def __init__(
        self,
        storage: IStorage,
        watches: Watches,
        merge_stored: Callable[[Document, StoredDocument], None],
        capacity: int = 1000,
    ) -> None:
        """
        @param merge_stored: merges a re-read into a stale cached document (and tells its
            subscribers what changed).
        """
        self._storage = storage
        self._watches = watches
        self._merge_stored = merge_stored
        self._capacity = capacity
        self._docs: OrderedDict[str, Document] = OrderedDict()
        self._loading: dict[str, list[Deferred]] = {}
        self._subscribers: dict[str, set[Hashable]] = {}

    def open(self, doc_id: str) -> "Deferred[Document]":
        """The document, from the cache or from storage (empty if it was never written)."""
        doc = self._docs.get(doc_id)
        if doc is not None:
            self._docs.move_to_end(doc_id)
            if not doc.stale:
                return succeed(doc)
        d: Deferred = Deferred()
        waiters = self._loading.setdefault(doc_id, [])
        waiters.append(d)
        if len(waiters) == 1:
            self._storage.load(doc_id).addCallbacks(
                self._loaded, self._load_failed, callbackArgs=(doc_id,), errbackArgs=(doc_id,)
            )
        return d

    def _loaded(self, stored: Optional[StoredDocument], doc_id: str) -> None:
        doc = self._docs.get(doc_id)
        if doc is not None:  # a stale one, re-read
            if stored is not None:
                self._merge_stored(doc, stored)
            doc.stale = False
        else:
            if stored is None:
                doc = Document(doc_id)
            else:
                doc = Document(doc_id, stored.fields, stored.clock, stored.text, stored.stamps)
            self._docs[doc_id] = doc
            self._watches.watch(doc_id)
            self._evict(keep=doc_id)
        for waiter in self._loading.pop(doc_id):
            waiter.callback(doc)

    def _load_failed(self, failure: Failure, doc_id: str) -> None:
        # Serving an empty document in place of one storage could not read would let clients
        # overwrite what they never saw; the request fails instead and the client retries.
        if failure.check(StorageUnavailable):
            self._log.warn("could not load document {doc}: {error}", doc=doc_id, error=failure.getErrorMessage())
        else:
            self._log.failure("loading document {doc} failed", failure, doc=doc_id)
        for waiter in self._loading.pop(doc_id):
            waiter.errback(failure)

    def _evict(self, keep: str) -> None:
        """
        Drop idle documents, least recently used first, down to the capacity.  C{keep}, the one
        just loaded, is never dropped: its opener is about to use it, and a second open would
        otherwise build a second object for the same document.
        """
        if len(self._docs) <= self._capacity:
            return
        for doc_id in list(self._docs):
            if len(self._docs) <= self._capacity:
                break
            if doc_id != keep and not self._subscribers.get(doc_id):
                del self._docs[doc_id]
                self._watches.unwatch(doc_id)

    def peek(self, doc_id: str) -> Optional[Document]:
        """The cached document, without loading it or touching its LRU position."""
        return self._docs.get(doc_id)

    def documents(self) -> Iterator[Document]:
        return iter(self._docs.values())

    def __len__(self) -> int:
        return len(self._docs)

    def subscribe(self, doc_id: str, subscriber: Hashable) -> None:
        self._subscribers.setdefault(doc_id, set()).add(subscriber)

    def unsubscribe(self, doc_id: str, subscriber: Hashable) -> None:
        subscribers = self._subscribers.get(doc_id)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[doc_id]

    def subscribers(self, doc_id: str) -> set[Hashable]:
        return self._subscribers.get(doc_id, set())

    def clear(self) -> Deferred:
        """
        Forget every document, in the cache and in storage (the test reset endpoint).  Documents
        that still have subscribers are emptied in place, so those connections stay subscribed.
        """
        for doc_id in list(self._docs):
            if self._subscribers.get(doc_id):
                self._docs[doc_id].reset()
            else:
                del self._docs[doc_id]
                self._watches.unwatch(doc_id)
        return self._storage.clear()
