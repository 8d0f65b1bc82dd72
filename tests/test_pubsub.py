"""
Fan-out between server instances (docs/architecture.md, "Other instances"):
L{LocalBus}/L{LocalPubSub} on their own, then two servers on one bus, each with its own clients,
checking that writes and presence reach the other instance and that both converge.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from synckit.pubsub.interface import IPubSub
from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.sync.engine import RESYNC_BACKOFF
from synckit.session import Session
from synckit.storage.interface import DocumentWrites, FieldWrite, StorageUnavailable
from synckit.sync.document import Text
from synckit.sync.fugue import FugueText
from synckit.sync.document import Document
from tests.helpers import FakeClient, Harness, HarnessCase, text_state, vector

TOMBSTONE = {"__deleted": True}


def delta(doc_id: str, changes: dict[str, Any], id: str = "w", clock: Any = None) -> dict[str, Any]:
    return {"id": id, "documentId": doc_id, "delta": changes, "vectorClock": clock or {}}


def cached(h: Harness, doc_id: str) -> Document:
    """The document C{h}'s server holds in its cache, which must be there."""
    doc = h.server.engine.registry.peek(doc_id)
    if doc is None:
        raise AssertionError(f"{doc_id} is not cached")
    return doc


def deltas(client: FakeClient) -> list[tuple[str, Any]]:
    """The (field, value) of each delta C{client} received since the last take."""
    return [(m["field"], m["value"]) for m in client.take() if m["type"] == "delta"]


class Endpoint:
    """A LocalPubSub with a receiver that records what it is handed."""

    def __init__(self, bus: LocalBus) -> None:
        self.pubsub = LocalPubSub(bus)
        self.received: list[tuple[str, str, dict[str, Any]]] = []
        self.resyncs = 0
        self.pubsub.start(lambda kind, doc_id, payload: self.received.append((kind, doc_id, payload)), self.resync)

    def resync(self) -> None:
        self.resyncs += 1


class LocalBusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = LocalBus(self.clock)  # type: ignore[arg-type]

    def test_provides_interface(self) -> None:
        """LocalPubSub provides IPubSub, and each endpoint has its own instance id."""
        a, b = LocalPubSub(self.bus), LocalPubSub(self.bus)
        self.assertTrue(IPubSub.providedBy(a))
        self.assertNotEqual(a.instance_id, b.instance_id)
        self.assertEqual(LocalPubSub(self.bus, "fixed").instance_id, "fixed")

    def test_delivery_on_later_turn(self) -> None:
        """A publication reaches a watcher only when the reactor turns, never inside publish()."""
        a, b = Endpoint(self.bus), Endpoint(self.bus)
        b.pubsub.watch("d")
        result = a.pubsub.publish("delta", "d", {"n": 1})
        self.successResultOf(result)
        self.assertEqual(b.received, [])
        self.clock.advance(0)
        self.assertEqual(b.received, [("delta", "d", {"n": 1})])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_only_watchers_of_document(self) -> None:
        """Only endpoints watching the publication's document receive it."""
        a, b, c, d = (Endpoint(self.bus) for _ in range(4))
        b.pubsub.watch("doc")
        c.pubsub.watch("other")
        a.pubsub.publish("awareness", "doc", {"n": 1})
        self.clock.advance(0)
        self.assertEqual(b.received, [("awareness", "doc", {"n": 1})])
        self.assertEqual((c.received, d.received), ([], []))

    def test_never_back_to_sender(self) -> None:
        """The publisher does not receive its own publication, even though it watches the document."""
        a, b = Endpoint(self.bus), Endpoint(self.bus)
        a.pubsub.watch("d")
        b.pubsub.watch("d")
        a.pubsub.publish("delta", "d", {"n": 1})
        self.clock.advance(0)
        self.assertEqual(a.received, [])
        self.assertEqual(len(b.received), 1)

    def test_order_kept(self) -> None:
        """Publications reach a watcher in the order they were published."""
        a, b = Endpoint(self.bus), Endpoint(self.bus)
        b.pubsub.watch("d")
        for n in range(5):
            a.pubsub.publish("delta", "d", {"n": n})
        self.clock.advance(0)
        self.assertEqual([p["n"] for _, _, p in b.received], list(range(5)))

    def test_unwatch_stops_delivery(self) -> None:
        """After unwatch, nothing is delivered, including publications already in flight."""
        a, b = Endpoint(self.bus), Endpoint(self.bus)
        b.pubsub.watch("d")
        a.pubsub.publish("delta", "d", {"n": 1})
        b.pubsub.unwatch("d")
        self.clock.advance(0)
        a.pubsub.publish("delta", "d", {"n": 2})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(b.received, [])

    def test_stop_unwatches_everything(self) -> None:
        """stop() unwatches every document and drops the receiver."""
        a, b = Endpoint(self.bus), Endpoint(self.bus)
        b.pubsub.watch("d1")
        b.pubsub.watch("d2")
        a.pubsub.publish("delta", "d1", {"n": 1})
        self.successResultOf(b.pubsub.stop())
        self.clock.advance(0)
        a.pubsub.publish("delta", "d2", {"n": 2})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(b.received, [])

    def test_one_watcher_left(self) -> None:
        """When one of two watchers unwatches, the other still receives."""
        a, b, c = Endpoint(self.bus), Endpoint(self.bus), Endpoint(self.bus)
        b.pubsub.watch("d")
        c.pubsub.watch("d")
        b.pubsub.unwatch("d")
        a.pubsub.publish("delta", "d", {"n": 1})
        self.clock.advance(0)
        self.assertEqual((len(b.received), len(c.received)), (0, 1))


class MultiInstanceTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        """Two servers, A and B, on one clock and one bus."""
        self.clock = Clock()
        bus = LocalBus(self.clock)  # type: ignore[arg-type]
        self.a = Harness(clock=self.clock, bus=bus)
        self.b = Harness(clock=self.clock, bus=bus)

        def no_timers_left() -> None:
            self.clock.advance(0)
            self.assertEqual(self.clock.getDelayedCalls(), [])

        self.addCleanup(no_timers_left)

    def subscriber(self, h: Harness, doc_id: str = "d") -> tuple[Session, FakeClient]:
        """A connection on C{h} subscribed to C{doc_id}, with its sync_response taken."""
        session, client = h.connect()
        h.send(session, "subscribe", {"id": "s", "documentId": doc_id})
        self.assertEqual([m["type"] for m in client.take()], ["sync_response"])
        return session, client

    def fields(self, h: Harness, doc_id: str = "d") -> dict[str, Any]:
        return cached(h, doc_id).fields


class RelayTests(MultiInstanceTestCase):
    def test_write_reaches_other_instance(self) -> None:
        """
        A write on A is merged into B's cached document and broadcast to B's subscriber once the
        clock turns, not before; A's writer gets its own echo as usual.
        """
        writer, writer_client = self.subscriber(self.a)
        _, remote_client = self.subscriber(self.b)
        self.a.send(writer, "delta", delta("d", {"a": 1, "b": [2]}, clock={"sdk-a": 5}))
        self.assertEqual([m["type"] for m in writer_client.take()], ["ack"])
        self.assertEqual(self.fields(self.b), {})
        self.assertEqual(remote_client.take(), [])

        self.clock.advance(0)

        self.assertEqual(self.fields(self.b), {"a": 1, "b": [2]})
        received = remote_client.of_type("delta")
        self.assertEqual([(m["field"], m["value"]) for m in received], [("a", 1), ("b", [2])])
        self.assertEqual(vector(received[0]["clock"]), {writer.id: 2, "sdk-a": 5})
        self.assertEqual(vector(cached(self.b, "d").clock), {writer.id: 2, "sdk-a": 5})
        self.assertEqual(deltas(writer_client), [("a", 1), ("b", [2])])

    def test_delete_reaches_other_instance(self) -> None:
        """A delete on A removes the field on B, and B's subscriber gets the tombstone."""
        writer, _ = self.subscriber(self.a)
        _, remote_client = self.subscriber(self.b)
        self.a.send(writer, "delta", delta("d", {"a": 1, "b": 2}))
        self.clock.advance(0)
        remote_client.take()
        self.a.send(writer, "delta", delta("d", {"a": TOMBSTONE}))
        self.clock.advance(0)
        self.assertEqual(self.fields(self.b), {"b": 2})
        self.assertEqual(deltas(remote_client), [("a", TOMBSTONE)])

    def test_text_reaches_other_instance(self) -> None:
        """
        A text-state write on A is merged into B's cached text, and B's subscribers get it at
        once as a text relay carrying the merged state and the writer's client id.
        """
        writer, _ = self.subscriber(self.a)
        _, remote_client = self.subscriber(self.b)
        other = text_state("bob", "World")
        self.b.send(self.b.connect()[0], "delta_batch", {"id": "b", "documentId": "d", "deltas": [{"type": "text-state", "state": other}]})
        self.clock.advance(0)
        remote_client.take()
        op = {"type": "text-state", "state": text_state("alice", "Hello"), "clientId": "alice"}
        self.a.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": [op]})
        self.clock.advance(0)
        [relay] = remote_client.of_type("delta_batch")
        self.assertTrue(relay["isTextOperation"])
        [relayed] = relay["deltas"]
        self.assertEqual(relayed["clientId"], "alice")
        text_a, text_b = cached(self.a, "d").text.state, cached(self.b, "d").text.state
        self.assertEqual(text_a.to_json(), text_b.to_json())
        self.assertEqual(FugueText.parse(relayed["state"]).text(), text_a.text())
        self.assertEqual(sorted(text_a.text()), sorted("HelloWorld"))

    def test_ops_reach_other_instance(self) -> None:
        """Counter ops from A reach every subscriber on B once, and A's other subscribers, never A's writer."""
        writer, writer_client = self.subscriber(self.a)
        _, local_client = self.subscriber(self.a)
        _, remote_client = self.subscriber(self.b)
        op = {"type": "counter", "operation": "increment", "value": 2, "documentId": "d", "clientId": "c"}
        self.a.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": [op]})
        self.clock.advance(0)
        for client in (local_client, remote_client):
            [relay] = client.of_type("delta_batch")
            self.assertEqual(relay["deltas"], [op])
        self.assertEqual(writer_client.of_type("delta_batch"), [])

    def test_not_cached_not_relayed(self) -> None:
        """An instance that does not hold the document is not told about it (storage is the source of truth)."""
        writer, _ = self.subscriber(self.a)
        self.a.send(writer, "delta", delta("d", {"a": 1}))
        self.clock.advance(0)
        self.assertIsNone(self.b.server.engine.registry.peek("d"))

    def test_sequential_writes_later_wins_everywhere(self) -> None:
        """A write on B made after it has seen A's write wins on both instances, even in the same millisecond."""
        writer_a, client_a = self.subscriber(self.a)
        writer_b, client_b = self.subscriber(self.b)
        self.a.send(writer_a, "delta", delta("d", {"x": "from A"}))
        self.clock.advance(0)
        self.b.send(writer_b, "delta", delta("d", {"x": "from B"}))
        self.clock.advance(0)
        self.assertEqual(self.fields(self.a), {"x": "from B"})
        self.assertEqual(self.fields(self.b), {"x": "from B"})
        self.assertEqual(deltas(client_a)[-1], ("x", "from B"))
        self.assertEqual(deltas(client_b)[-1], ("x", "from B"))

    def test_concurrent_writes_converge(self) -> None:
        """
        One client on each instance writes the same field in the same turn: once the publications
        have crossed, both instances hold the same value, and each client's last broadcast is it.
        """
        writer_a, client_a = self.subscriber(self.a)
        writer_b, client_b = self.subscriber(self.b)  # each instance numbers its connections from conn-1
        self.a.send(writer_a, "delta", delta("d", {"x": "from A", "only-a": 1}))
        self.b.send(writer_b, "delta", delta("d", {"x": "from B", "only-b": 2}))
        self.clock.advance(0)
        fields_a, fields_b = self.fields(self.a), self.fields(self.b)
        self.assertEqual(fields_a, fields_b)
        self.assertIn(fields_a["x"], ("from A", "from B"))
        self.assertEqual((fields_a["only-a"], fields_a["only-b"]), (1, 2))
        last_a = [v for f, v in deltas(client_a) if f == "x"][-1]
        last_b = [v for f, v in deltas(client_b) if f == "x"][-1]
        self.assertEqual((last_a, last_b), (fields_a["x"], fields_a["x"]))

    def test_concurrent_writes_converge_distinct_connection_ids(self) -> None:
        """Concurrent writes by connections with different ids on the two instances converge too."""
        self.b.connect("192.0.2.50")  # B's writer becomes conn-2, A's is conn-1
        writer_a, _ = self.subscriber(self.a)
        writer_b, _ = self.subscriber(self.b)
        self.assertNotEqual(writer_a.id, writer_b.id)
        self.a.send(writer_a, "delta", delta("d", {"x": "from A"}))
        self.b.send(writer_b, "delta", delta("d", {"x": "from B"}))
        self.clock.advance(0)
        self.assertEqual(self.fields(self.a), self.fields(self.b))

    def test_concurrent_delete_and_write_converge(self) -> None:
        """A delete on one instance racing a write on the other leaves both instances alike."""
        writer_a, _ = self.subscriber(self.a)
        writer_b, _ = self.subscriber(self.b)
        self.a.send(writer_a, "delta", delta("d", {"x": 1}))
        self.clock.advance(0)
        self.a.send(writer_a, "delta", delta("d", {"x": TOMBSTONE}))
        self.b.send(writer_b, "delta", delta("d", {"x": 2}))
        self.clock.advance(0)
        self.assertEqual(self.fields(self.a), self.fields(self.b))


class AwarenessRelayTests(MultiInstanceTestCase):
    def watcher(self, h: Harness, doc_id: str = "d", subscribe_document: bool = False) -> tuple[Session, FakeClient]:
        """A connection on C{h} that sent awareness_subscribe (and subscribe, if asked)."""
        session, client = h.connect()
        if subscribe_document:
            h.send(session, "subscribe", {"id": "s", "documentId": doc_id})
        h.send(session, "awareness_subscribe", {"documentId": doc_id})
        client.take()
        return session, client


    def test_update_reaches_other_instance(self) -> None:
        """
        An awareness update on A reaches B's awareness subscribers on the next turn, with the
        sender's values, and is stored on B for later subscribers.
        """
        sender, sender_client = self.watcher(self.a, subscribe_document=True)
        _, remote_client = self.watcher(self.b, subscribe_document=True)
        self.a.send(sender, "awareness_update", {"documentId": "d", "clientId": "c1", "state": {"cursor": 4}, "clock": 3})
        self.assertEqual([m["type"] for m in sender_client.take()], ["awareness_update"])
        self.assertEqual(remote_client.take(), [])
        self.clock.advance(0)
        [message] = remote_client.take()
        self.assertEqual(
            (message["type"], message["documentId"], message["clientId"], message["state"], message["clock"]),
            ("awareness_update", "d", "c1", {"cursor": 4}, 3),
        )
        self.assertEqual(self.b.present(), [{"clientId": "c1", "state": {"cursor": 4}, "clock": 3}])

    def test_leave_reaches_other_instance(self) -> None:
        """A null state on A removes the client on B too and is announced there."""
        sender, _ = self.watcher(self.a, subscribe_document=True)
        _, remote_client = self.watcher(self.b, subscribe_document=True)
        self.a.send(sender, "awareness_update", {"documentId": "d", "clientId": "c1", "state": "here", "clock": 1})
        self.a.send(sender, "awareness_update", {"documentId": "d", "clientId": "c1", "state": None, "clock": 2})
        self.clock.advance(0)
        self.assertEqual([m["state"] for m in remote_client.take()], ["here", None])
        self.assertEqual(self.b.present(), [])

    def test_update_reaches_awareness_only_subscriber(self) -> None:
        """
        Presence is separate from document subscriptions (sections 4.13, 6.7): a connection on B
        that only sent awareness_subscribe still hears A's awareness updates.
        """
        sender, _ = self.watcher(self.a)
        _, remote_client = self.watcher(self.b)
        self.a.send(sender, "awareness_update", {"documentId": "d", "clientId": "c1", "state": "here", "clock": 1})
        self.clock.advance(0)
        self.assertEqual([(m["type"], m["state"]) for m in remote_client.take()], [("awareness_update", "here")])


class ResyncTests(HarnessCase):
    """
    After pub/sub reconnects, cached documents are re-read from storage; a storage outage at
    that moment delays the resync rather than losing what other instances wrote meanwhile.
    """

    def setUp(self) -> None:
        self.h = self.harness()
        session, self.client = self.h.connect()
        self.h.send(session, "subscribe", {"id": "s", "documentId": "d"})
        self.client.take()
        # What another instance saved while this one missed its publications.
        self.h.storage.save([DocumentWrites("d", [FieldWrite("a", 1, "other-conn", 1, 1_700_000_000_000)])])
        self.failures = 0
        self.loads = 0
        load = self.h.storage.load

        def failing_load(doc_id: str) -> Deferred:
            self.loads += 1
            if self.failures:
                self.failures -= 1
                return fail(StorageUnavailable("PostgreSQL is restarting"))
            return load(doc_id)

        self.h.storage.load = failing_load  # type: ignore[method-assign]

    def test_text_is_resynced(self) -> None:
        """A resync merges text another instance stored, and relays the merged text to subscribers."""
        stored = Text(FugueText.parse(text_state("elsewhere", "Hi")), 5)
        self.h.storage.save([DocumentWrites("d", text=stored)])
        self.h.server.engine.resync()
        self.h.flush()
        self.assertEqual(cached(self.h, "d").text.state.text(), "Hi")
        [relay] = self.client.of_type("delta_batch")
        self.assertEqual(FugueText.parse(relay["deltas"][0]["state"]).text(), "Hi")
        self.assertEqual(relay["deltas"][0]["clientId"], "server")

    def test_merges_and_broadcasts_what_storage_holds(self) -> None:
        """A resync merges the stored write into the cache and tells the subscriber."""
        self.h.server.engine.resync()
        self.h.flush()
        self.assertEqual(cached(self.h, "d").fields, {"a": 1})
        self.assertEqual(deltas(self.client), [("a", 1)])

    def test_retries_while_storage_is_unavailable(self) -> None:
        """Loads that fail are tried again after the backoff delays, and the write still arrives."""
        self.failures = 2
        self.h.server.engine.resync()
        self.h.flush()
        self.assertEqual((self.loads, deltas(self.client)), (1, []))
        self.h.clock.advance(RESYNC_BACKOFF[0])
        self.assertEqual(self.loads, 2)
        self.h.clock.advance(RESYNC_BACKOFF[1])
        self.h.flush()
        self.assertEqual(self.loads, 3)
        self.assertEqual(deltas(self.client), [("a", 1)])

    def test_gives_up_after_the_last_delay(self) -> None:
        """If storage never comes back the resync stops, with a warning, and leaves no timer."""
        self.failures = len(RESYNC_BACKOFF) + 1
        self.h.server.engine.resync()
        for delay in RESYNC_BACKOFF:
            self.h.clock.advance(delay)
        self.h.flush()
        self.assertEqual(self.loads, len(RESYNC_BACKOFF) + 1)
        self.assertEqual((cached(self.h, "d").fields, deltas(self.client)), ({}, []))
