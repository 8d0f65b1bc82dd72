"""
Broadcast batching (docs/protocol.md, section 5), driven through the server on a Clock.  Our
deviation from the reference: a batch flushes at the end of the reactor turn (C{callLater(0)})
rather than 50 ms later, and each field goes out with its value at flush time.  A
disconnect does not drop pending broadcasts.
"""

from __future__ import annotations

from typing import Any


from synckit.session import Session
from synckit.sync.broadcast import deliver
from synckit.sync.document import Document
from synckit.wire import Frame
from tests.helpers import FakeClient, Harness, HarnessCase, vector

TOMBSTONE = {"__deleted": True}


def delta(doc_id: str, changes: dict[str, Any], id: str = "w") -> dict[str, Any]:
    return {"id": id, "documentId": doc_id, "delta": changes, "vectorClock": {}}


def broadcasts(client: FakeClient) -> list[tuple[str, Any]]:
    """(field, value) of every delta broadcast received since the last take, in order."""
    return [(m["field"], m["value"]) for m in client.take() if m["type"] == "delta"]


def cached(h: Harness, doc_id: str) -> Document:
    """The document C{h}'s server holds in its cache, which must be there."""
    doc = h.server.engine.registry.peek(doc_id)
    if doc is None:
        raise AssertionError(f"{doc_id} is not cached")
    return doc


class BroadcastTestCase(HarnessCase):

    def subscriber(self, h: Harness, doc_id: str = "d") -> tuple[Session, FakeClient]:
        """A connection subscribed to C{doc_id}, with its sync_response taken."""
        session, client = h.connect()
        h.send(session, "subscribe", {"id": "s", "documentId": doc_id})
        self.assertEqual([m["type"] for m in client.take()], ["sync_response"])
        return session, client


class TimingTests(BroadcastTestCase):
    def test_lone_write_next_turn(self) -> None:
        """A lone write is not broadcast inside the call that handled it, only on the next reactor turn."""
        h = self.harness()
        writer, writer_client = self.subscriber(h)
        _, reader_client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"a": 1}))
        self.assertEqual([m["type"] for m in writer_client.take()], ["ack"])
        self.assertEqual(reader_client.take(), [])
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.clock.advance(0)
        self.assertEqual(broadcasts(reader_client), [("a", 1)])
        self.assertEqual(broadcasts(writer_client), [("a", 1)])

    def test_no_delayed_calls_after_flush(self) -> None:
        """After the flush runs, nothing is left scheduled on the clock; a later write schedules anew."""
        h = self.harness()
        writer, client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.flush()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.send(writer, "delta", delta("d", {"a": 2}))
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.flush()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(broadcasts(client), [("a", 1), ("a", 2)])

    def test_one_flush_call_per_turn(self) -> None:
        """Many writes, to several documents, in one turn schedule a single flush."""
        h = self.harness()
        writer, _ = h.connect()
        for i in range(5):
            h.send(writer, "delta", delta(f"doc-{i % 2}", {"a": i}))
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.flush()

    def test_no_subscribers_no_error(self) -> None:
        """A flush for a document nobody subscribes to any more sends nothing and fails nothing."""
        h = self.harness()
        writer, client = h.connect()
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.send(writer, "unsubscribe", {"documentId": "d"})
        client.take()
        h.flush()
        self.assertEqual(client.take(), [])


class CoalescingTests(BroadcastTestCase):
    def test_same_turn_writes_go_out_together(self) -> None:
        """Writes from several connections in one turn all go out in the one flush, in write order."""
        h = self.harness()
        one, one_client = self.subscriber(h)
        two, two_client = self.subscriber(h)
        h.send(one, "delta", delta("d", {"a": 1}))
        h.send(two, "delta", delta("d", {"b": 2}))
        h.send(one, "delta", delta("d", {"c": 3}))
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.flush()
        self.assertEqual(broadcasts(one_client), [("a", 1), ("b", 2), ("c", 3)])
        self.assertEqual(broadcasts(two_client), [("a", 1), ("b", 2), ("c", 3)])

    def test_field_written_twice_once_with_last_value(self) -> None:
        """A field written twice in one turn goes out once, with its last value, in its first position."""
        h = self.harness()
        one, client = self.subscriber(h)
        two, _ = self.subscriber(h)
        h.send(one, "delta", delta("d", {"a": "first"}))
        h.send(two, "delta", delta("d", {"b": "only"}))
        h.send(two, "delta", delta("d", {"a": "last"}))
        h.flush()
        self.assertEqual(broadcasts(client), [("a", "last"), ("b", "only")])

    def test_delete_after_set_goes_out_as_tombstone(self) -> None:
        """A field set and then deleted in one turn goes out once, as the tombstone."""
        h = self.harness()
        writer, client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"a": 1, "b": 2}))
        h.send(writer, "delta", delta("d", {"a": TOMBSTONE}))
        h.flush()
        self.assertEqual(broadcasts(client), [("a", TOMBSTONE), ("b", 2)])

    def test_delete_of_missing_field_broadcast(self) -> None:
        """Deleting a field that never existed still broadcasts the tombstone (section 6.4)."""
        h = self.harness()
        writer, client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"nope": TOMBSTONE}))
        h.flush()
        self.assertEqual(broadcasts(client), [("nope", TOMBSTONE)])

    def test_documents_batched_separately(self) -> None:
        """Each document's subscribers get that document's fields only, each message naming it."""
        h = self.harness()
        writer, _ = h.connect()
        _, d1_client = self.subscriber(h, "d1")
        _, d2_client = self.subscriber(h, "d2")
        h.send(writer, "delta", delta("d1", {"a": 1}))
        h.send(writer, "delta", delta("d2", {"b": 2}))
        h.flush()
        self.assertEqual([(m["documentId"], m["field"]) for m in d1_client.of_type("delta")], [("d1", "a")])
        self.assertEqual([(m["documentId"], m["field"]) for m in d2_client.of_type("delta")], [("d2", "b")])

    def test_later_turn_is_a_new_batch(self) -> None:
        """A field written again after a flush is broadcast again in the next flush."""
        h = self.harness()
        writer, client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.flush()
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.flush()
        self.assertEqual(broadcasts(client), [("a", 1), ("a", 1)])


class RecipientTests(BroadcastTestCase):
    def test_everyone_same_messages_same_order(self) -> None:
        """Every subscriber, the writer included, receives identical delta messages (same ids too) in the same order."""
        h = self.harness()
        clients = [self.subscriber(h) for _ in range(4)]
        writer = clients[0][0]
        h.send(writer, "delta", delta("d", {"x": 1, "y": [1, 2], "z": None}))
        h.send(clients[2][0], "delta", delta("d", {"w": {"k": "v"}}))
        for _, client in clients:
            client.take()
        h.flush()
        received = [client.of_type("delta") for _, client in clients]
        self.assertEqual([(m["field"], m["value"]) for m in received[0]], [("x", 1), ("y", [1, 2]), ("z", None), ("w", {"k": "v"})])
        for other in received[1:]:
            self.assertEqual(other, received[0])
        for message in received[0]:
            self.assertEqual((message["documentId"], message["clientId"]), ("d", "server"))
        self.assertEqual(len({m["id"] for m in received[0]}), 4)

    def test_ack_precedes_echo(self) -> None:
        """The writer receives its ack before the echo of its own write (section 6.6)."""
        h = self.harness()
        writer, client = h.connect()
        h.send(writer, "delta", delta("d", {"a": 1}, id="m1"))
        h.flush()
        messages = client.take()
        self.assertEqual([m["type"] for m in messages], ["ack", "delta"])
        self.assertEqual(messages[0]["messageId"], "m1")

    def test_unauthenticated_subscribers_get_nothing(self) -> None:
        """A subscriber that is not authenticated receives no broadcast; authenticated ones do."""
        h = self.harness(auth_required=True)
        writer, writer_client = h.connect()
        h.send(writer, "auth", {"token": h.server.tokens.access_token("w", "w@example.com", {"canRead": ["*"], "canWrite": ["*"], "isAdmin": False})})
        self.assertEqual([m["type"] for m in writer_client.take()], ["auth_success"])
        anonymous, anonymous_client = h.connect("192.0.2.2")
        anonymous.subscribe("d")  # only reachable directly: the handlers refuse it
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.flush()
        self.assertEqual(anonymous_client.take(), [])
        self.assertEqual(broadcasts(writer_client), [("a", 1)])

    def test_deliver_skips_unauthenticated_and_excluded(self) -> None:
        """deliver() sends to authenticated recipients other than the excluded one."""

        class Recipient:
            def __init__(self, authenticated: bool) -> None:
                self.authenticated = authenticated
                self.sent: list[Frame] = []

            def send(self, frame: Frame) -> None:
                self.sent.append(frame)

        frame = Frame("delta", 1, {"id": "x"})
        yes, no, excluded = Recipient(True), Recipient(False), Recipient(True)
        deliver(frame, [yes, no, excluded], exclude=excluded)
        self.assertEqual((yes.sent, no.sent, excluded.sent), ([frame], [], []))

    def test_clock_at_flush_time(self) -> None:
        """
        Every message of a flush carries the document's whole clock as it is at flush time,
        including writes and merged client clocks that came after the field was queued.
        """
        h = self.harness()
        one, client = self.subscriber(h)
        two, _ = self.subscriber(h)
        h.send(one, "delta", delta("d", {"a": 1}))
        h.send(two, "delta", {"id": "w2", "documentId": "d", "delta": {"b": 2, "c": 3}, "vectorClock": {"sdk-1": 7}})
        h.flush()
        expected = {one.id: 1, two.id: 2, "sdk-1": 7}
        self.assertEqual(vector(cached(h, "d").clock), expected)
        self.assertEqual([vector(m["clock"]) for m in client.of_type("delta")], [expected] * 3)

    def test_value_at_flush_time(self) -> None:
        """The value sent is the document's value when the flush runs, not the one queued."""
        h = self.harness()
        writer, client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"a": 1}))
        cached(h, "d").merge("a", "changed", (h.server.now_ms() + 1, 1, "conn-99"))
        h.flush()
        self.assertEqual(broadcasts(client), [("a", "changed")])

    def test_failing_document_does_not_cost_others(self) -> None:
        """If sending one document's batch fails, the other documents' batches still go out, and the failure is logged."""
        h = self.harness()
        writer, _ = h.connect()
        _, bad_client = self.subscriber(h, "bad")
        _, good_client = self.subscriber(h, "good")

        def explode(frame: Frame, binary: bool) -> None:
            raise RuntimeError("transport broke")

        bad_client.send_frame = explode  # type: ignore[method-assign]
        h.send(writer, "delta", delta("bad", {"a": 1}))
        h.send(writer, "delta", delta("good", {"b": 2}))
        h.flush()
        self.assertEqual(broadcasts(good_client), [("b", 2)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_header_timestamp_is_server_time(self) -> None:
        """Broadcast messages carry the server's time in ms, not the client's."""
        h = self.harness()
        h.clock.advance(12.345)
        writer, client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.flush()
        self.assertEqual([m["timestamp"] for m in client.of_type("delta")], [h.server.now_ms()])


class DisconnectAndShutdownTests(BroadcastTestCase):
    def test_disconnect_keeps_pending_broadcasts(self) -> None:
        """
        When a subscriber disconnects before the flush, the pending broadcasts still reach the
        remaining subscribers, including when the one who left was the writer.
        """
        h = self.harness()
        writer, _ = self.subscriber(h)
        leaver, leaver_client = self.subscriber(h)
        _, stayer_client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.send(leaver, "delta", delta("d", {"b": 2}))
        leaver_client.take()
        leaver.closed()
        writer.closed()
        h.flush()
        self.assertEqual(broadcasts(stayer_client), [("a", 1), ("b", 2)])
        self.assertEqual(leaver_client.take(), [])

    def test_close_all_flushes_then_closes(self) -> None:
        """close_all() sends pending broadcasts first, then closes every session with the given code."""
        h = self.harness()
        writer, writer_client = self.subscriber(h)
        _, reader_client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"a": 1}))
        writer_client.take()
        self.assertIsNone(reader_client.closed)

        h.server.close_all(1001, "Server shutting down")

        self.assertEqual(broadcasts(reader_client), [("a", 1)])
        self.assertEqual(broadcasts(writer_client), [("a", 1)])
        self.assertEqual(reader_client.closed, (1001, "Server shutting down"))
        self.assertEqual(writer_client.closed, (1001, "Server shutting down"))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_nothing_after_close_all(self) -> None:
        """After close_all(), the end-of-turn flush has nothing left to send twice."""
        h = self.harness()
        writer, client = self.subscriber(h)
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.server.close_all(1001, "bye")
        client.take()
        h.flush()
        self.assertEqual(client.take(), [])


class ServedOrderTests(HarnessCase):
    def test_later_broadcast_outranks_earlier_for_the_sdk(self) -> None:
        """
        Two broadcasts of one field: the second's clock has the larger largest entry, even when
        the writes' own clock entries would tie (the SDK keeps the larger-stamped value, and
        breaks ties by comparing the values themselves).
        """
        h = self.harness()
        writer, client = h.connect()
        other, _ = h.connect()
        h.send(writer, "subscribe", {"id": "s", "documentId": "d"})
        h.send(writer, "delta", delta("d", {"title": "b"}))
        h.flush()
        h.send(other, "delta", delta("d", {"title": "a"}))
        h.flush()
        first, second = [m for m in client.of_type("delta")]
        self.assertEqual((first["value"], second["value"]), ("b", "a"))
        self.assertGreater(max(second["clock"].values()), max(first["clock"].values()))
