"""
The document registry: one shared load per document however many connections open it at once,
failures that reach every waiter and cache nothing, LRU eviction that spares documents with
subscribers, the re-read of stale documents, and the test reset.  Storage and pub/sub are
recording fakes.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from synckit.storage.interface import StoredDocument
from synckit.sync.document import Document, Text
from synckit.sync.registry import DocumentRegistry


class LoadError(Exception):
    """What the fake storage fails with."""


class FakeStorage:
    """
    Storage whose loads wait until the test fires them (C{pending}), unless C{immediate} is set,
    in which case they answer at once from C{stored}.
    """

    def __init__(self, immediate: bool = False) -> None:
        self.immediate = immediate
        self.stored: dict[str, StoredDocument] = {}
        self.loads: list[str] = []
        self.pending: dict[str, Deferred] = {}
        self.cleared = 0
        self.clear_result: Deferred = succeed(None)

    def load(self, doc_id: str) -> Deferred:
        self.loads.append(doc_id)
        if self.immediate:
            return succeed(self.stored.get(doc_id))
        d: Deferred = Deferred()
        self.pending[doc_id] = d
        return d

    def clear(self) -> Deferred:
        self.cleared += 1
        return self.clear_result


class FakePubSub:
    """Records which documents are watched, in order of calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.watched: set[str] = set()

    def watch(self, doc_id: str) -> None:
        self.calls.append(("watch", doc_id))
        self.watched.add(doc_id)

    def unwatch(self, doc_id: str) -> None:
        self.calls.append(("unwatch", doc_id))
        self.watched.discard(doc_id)


#: a text state: the registry only holds it
TEXT = Text(object(), 3)  # type: ignore[arg-type]


class RegistryTestCase(SynchronousTestCase):
    def registry(self, capacity: int = 1000, immediate: bool = True) -> tuple[DocumentRegistry, FakeStorage, FakePubSub]:
        storage, pubsub = FakeStorage(immediate), FakePubSub()
        #: (document, what storage held) for each re-read of a stale document
        self.merged: list[tuple[Document, StoredDocument]] = []
        registry = DocumentRegistry(storage, pubsub, lambda doc, stored: self.merged.append((doc, stored)), capacity)  # type: ignore[arg-type]
        return registry, storage, pubsub

    def opened(self, registry: DocumentRegistry, doc_id: str) -> Document:
        """Open a document whose load answers at once."""
        doc = self.successResultOf(registry.open(doc_id))
        self.assertIsInstance(doc, Document)
        return doc


class OpenTests(RegistryTestCase):
    def test_never_written_is_empty(self) -> None:
        """A document storage does not have opens empty, is cached and watched."""
        registry, _, pubsub = self.registry()
        doc = self.opened(registry, "d")
        self.assertEqual((doc.id, doc.fields, doc.clock, doc.text), ("d", {}, {}, None))
        self.assertIs(registry.peek("d"), doc)
        self.assertEqual(pubsub.calls, [("watch", "d")])

    def test_loaded_from_storage(self) -> None:
        """A stored document opens with its fields, clock and text state."""
        registry, storage, _ = self.registry()
        storage.stored["d"] = StoredDocument({"a": 1}, {"conn-1": 2}, TEXT, {})
        doc = self.opened(registry, "d")
        self.assertEqual((doc.fields, doc.clock, doc.text), ({"a": 1}, {"conn-1": 2}, TEXT))

    def test_cached_after_first_open(self) -> None:
        """A second open returns the same object without asking storage again."""
        registry, storage, pubsub = self.registry()
        first = self.opened(registry, "d")
        second = self.opened(registry, "d")
        self.assertIs(first, second)
        self.assertEqual(storage.loads, ["d"])
        self.assertEqual(pubsub.calls, [("watch", "d")])

    def test_concurrent_opens_share_one_load(self) -> None:
        """
        Opens made while the document is still loading wait for the same load, and all get the
        same object once it arrives.
        """
        registry, storage, pubsub = self.registry(immediate=False)
        waiting = [registry.open("d") for _ in range(3)]
        self.assertEqual(storage.loads, ["d"])
        for d in waiting:
            self.assertNoResult(d)
        self.assertIsNone(registry.peek("d"))
        storage.pending["d"].callback(StoredDocument({"a": 1}, {}, None, {}))
        docs = [self.successResultOf(d) for d in waiting]
        self.assertIs(docs[0], docs[1])
        self.assertIs(docs[1], docs[2])
        self.assertIs(registry.peek("d"), docs[0])
        self.assertEqual(docs[0].fields, {"a": 1})
        self.assertEqual(pubsub.calls, [("watch", "d")])
        self.assertIs(self.successResultOf(registry.open("d")), docs[0])
        self.assertEqual(storage.loads, ["d"])

    def test_loads_of_different_documents_are_separate(self) -> None:
        """Two documents loading at once each get their own load and their own object."""
        registry, storage, _ = self.registry(immediate=False)
        a, b = registry.open("a"), registry.open("b")
        self.assertEqual(storage.loads, ["a", "b"])
        storage.pending["b"].callback(None)
        self.assertNoResult(a)
        self.assertEqual(self.successResultOf(b).id, "b")
        storage.pending["a"].callback(None)
        self.assertEqual(self.successResultOf(a).id, "a")

    def test_load_failure_reaches_every_waiter(self) -> None:
        """A failed load errbacks every waiting open with the error, and caches and watches nothing."""
        registry, storage, pubsub = self.registry(immediate=False)
        waiting = [registry.open("d"), registry.open("d")]
        storage.pending["d"].errback(LoadError("disk on fire"))
        for d in waiting:
            self.failureResultOf(d, LoadError)
        self.assertIsNone(registry.peek("d"))
        self.assertEqual(len(registry), 0)
        self.assertEqual(pubsub.calls, [])
        self.assertEqual(len(self.flushLoggedErrors(LoadError)), 1)

    def test_open_after_failure_loads_again(self) -> None:
        """After a failed load, the next open asks storage again and can succeed."""
        registry, storage, _ = self.registry(immediate=False)
        first = registry.open("d")
        storage.pending["d"].errback(LoadError())
        self.failureResultOf(first, LoadError)
        self.flushLoggedErrors(LoadError)
        second = registry.open("d")
        self.assertEqual(storage.loads, ["d", "d"])
        storage.pending["d"].callback(None)
        self.assertIs(self.successResultOf(second), registry.peek("d"))


class EvictionTests(RegistryTestCase):
    def test_lru_beyond_capacity(self) -> None:
        """Beyond capacity the least recently opened document is dropped and unwatched."""
        registry, _, pubsub = self.registry(capacity=2)
        for doc_id in ("a", "b", "c"):
            self.opened(registry, doc_id)
        self.assertEqual(len(registry), 2)
        self.assertIsNone(registry.peek("a"))
        self.assertIsNotNone(registry.peek("b"))
        self.assertIsNotNone(registry.peek("c"))
        self.assertEqual(pubsub.watched, {"b", "c"})
        self.assertIn(("unwatch", "a"), pubsub.calls)

    def test_open_touches(self) -> None:
        """Opening a cached document makes it the most recently used, so another one goes first."""
        registry, _, pubsub = self.registry(capacity=2)
        self.opened(registry, "a")
        self.opened(registry, "b")
        self.opened(registry, "a")
        self.opened(registry, "c")
        self.assertIsNone(registry.peek("b"))
        self.assertEqual(pubsub.watched, {"a", "c"})

    def test_peek_does_not_touch(self) -> None:
        """peek() does not change the LRU order."""
        registry, _, _ = self.registry(capacity=2)
        self.opened(registry, "a")
        self.opened(registry, "b")
        registry.peek("a")
        self.opened(registry, "c")
        self.assertIsNone(registry.peek("a"))

    def test_evicted_document_reloads(self) -> None:
        """An evicted document is loaded from storage again on its next open, as a new object."""
        registry, storage, _ = self.registry(capacity=1)
        a = self.opened(registry, "a")
        self.opened(registry, "b")
        again = self.opened(registry, "a")
        self.assertIsNot(a, again)
        self.assertEqual(storage.loads, ["a", "b", "a"])

    def test_subscribed_documents_skipped(self) -> None:
        """Documents with subscribers are never evicted; the oldest unsubscribed one goes instead."""
        registry, _, pubsub = self.registry(capacity=2)
        a = self.opened(registry, "a")
        registry.subscribe("a", object())
        self.opened(registry, "b")
        self.opened(registry, "c")
        self.assertIs(registry.peek("a"), a)
        self.assertIsNone(registry.peek("b"))
        self.assertEqual(pubsub.watched, {"a", "c"})
        self.assertNotIn(("unwatch", "a"), pubsub.calls)

    def test_unsubscribed_document_becomes_evictable(self) -> None:
        """Once its last subscriber leaves, a document can be evicted again."""
        registry, _, _ = self.registry(capacity=1)
        subscriber = object()
        self.opened(registry, "a")
        registry.subscribe("a", subscriber)
        registry.unsubscribe("a", subscriber)
        self.assertEqual(registry.subscribers("a"), set())
        self.opened(registry, "b")
        self.assertIsNone(registry.peek("a"))

    def test_document_not_evicted_by_its_own_load(self) -> None:
        """
        When every other cached document has subscribers, the document just loaded stays cached
        until its opener can subscribe: the object handed to the opener is the registry's, and a
        second open gets that same object rather than a fresh copy from storage.
        """
        registry, storage, pubsub = self.registry(capacity=1)
        self.opened(registry, "a")
        registry.subscribe("a", object())
        b = self.opened(registry, "b")
        self.assertIs(registry.peek("b"), b)
        self.assertIs(self.opened(registry, "b"), b)
        self.assertEqual(storage.loads, ["a", "b"])
        self.assertIn("b", pubsub.watched)


class SubscriberTests(RegistryTestCase):
    def test_subscribe_and_count(self) -> None:
        """Subscribers are tracked per document; unsubscribing an unknown one is harmless."""
        registry, _, _ = self.registry()
        s1, s2 = object(), object()
        registry.subscribe("a", s1)
        registry.subscribe("a", s2)
        registry.subscribe("b", s1)
        registry.subscribe("a", s1)
        self.assertEqual(registry.subscribers("a"), {s1, s2})
        self.assertEqual(registry.subscribers("b"), {s1})
        registry.unsubscribe("a", s1)
        registry.unsubscribe("zzz", s1)
        registry.unsubscribe("b", s2)
        self.assertEqual(registry.subscribers("a"), {s2})
        self.assertEqual(registry.subscribers("b"), {s1})


class ClearTests(RegistryTestCase):
    def test_clear(self) -> None:
        """
        clear() empties documents that have subscribers in place (same object), drops and unwatches
        the others, clears storage and returns storage's Deferred.
        """
        registry, storage, pubsub = self.registry()
        kept = self.opened(registry, "kept")
        self.opened(registry, "dropped")
        registry.subscribe("kept", object())
        kept.merge("a", 1, (5, 1, "conn-1"))
        kept.clock["conn-1"] = 1
        kept.last_modified = 9
        kept.text = TEXT
        storage.clear_result = Deferred()

        result = registry.clear()

        self.assertIs(result, storage.clear_result)
        self.assertEqual(storage.cleared, 1)
        self.assertIs(registry.peek("kept"), kept)
        self.assertEqual((kept.fields, kept.clock, kept.last_modified, kept.text), ({}, {}, None, None))
        self.assertIsNone(registry.peek("dropped"))
        self.assertEqual(pubsub.watched, {"kept"})
        self.assertNotIn(("unwatch", "kept"), pubsub.calls)
        self.assertEqual([d.id for d in registry.documents()], ["kept"])

    def test_clear_keeps_subscriptions(self) -> None:
        """Subscribers of a cleared document are still subscribed, to the same object."""
        registry, _, _ = self.registry()
        subscriber = object()
        doc = self.opened(registry, "d")
        registry.subscribe("d", subscriber)
        self.successResultOf(registry.clear())
        self.assertEqual(registry.subscribers("d"), {subscriber})
        self.assertIs(self.opened(registry, "d"), doc)

    def test_dropped_document_reloads(self) -> None:
        """A document dropped by clear() is loaded from storage again on its next open."""
        registry, storage, _ = self.registry()
        before = self.opened(registry, "d")
        self.successResultOf(registry.clear())
        after = self.opened(registry, "d")
        self.assertIsNot(before, after)
        self.assertEqual(storage.loads, ["d", "d"])


class StaleTests(RegistryTestCase):
    def test_stale_document_is_reread_before_it_is_served(self) -> None:
        """
        A stale document (a save's outcome unknown) is re-read on its next open; what storage
        holds is merged into the same object, which is served only then, and no longer stale.
        """
        registry, storage, _ = self.registry(immediate=False)
        opening = registry.open("d")
        storage.pending.pop("d").callback(None)
        doc = self.successResultOf(opening)
        doc.stale = True

        again = registry.open("d")
        self.assertNoResult(again)
        stored = StoredDocument({"a": 1}, {}, None, {"a": (5, 1, "conn-1")})
        storage.pending.pop("d").callback(stored)

        self.assertIs(self.successResultOf(again), doc)
        self.assertEqual(self.merged, [(doc, stored)])
        self.assertFalse(doc.stale)
        self.assertEqual(storage.loads, ["d", "d"])

    def test_failed_reread_stays_stale(self) -> None:
        """A re-read that fails fails the open, and the document stays stale for the next one."""
        registry, storage, _ = self.registry(immediate=False)
        opening = registry.open("d")
        storage.pending.pop("d").callback(None)
        doc = self.successResultOf(opening)
        doc.stale = True
        failed = registry.open("d")
        storage.pending.pop("d").errback(LoadError())
        self.failureResultOf(failed, LoadError)
        self.flushLoggedErrors(LoadError)
        self.assertTrue(doc.stale)
        self.assertNoResult(registry.open("d"))
