"""
The engine's one write path, save then show: nobody sees a write before storage confirms it, a
failed save shows nothing, and a save whose outcome is unknown (a timeout) is never guessed at:
its documents are re-read from storage.  Storage is in memory, held back or failed by the test.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred, fail

from synckit.storage.interface import DocumentWrites, FieldWrite, StorageTimeout, StorageUnavailable
from synckit.sync.fugue import FugueText
from tests.helpers import FakeClient, Harness, HarnessCase, text_state, vector


class HeldSaves:
    """Storage saves that wait for the test: C{release(i)} saves for real, C{fail(i)} fails."""

    def __init__(self, h: Harness) -> None:
        self._save = h.storage.save
        self.waiting: list[tuple[Sequence[DocumentWrites], Deferred]] = []
        h.storage.save = self.save  # type: ignore[method-assign]

    def save(self, writes: Sequence[DocumentWrites]) -> Deferred:
        d: Deferred = Deferred()
        self.waiting.append((writes, d))
        return d

    def release(self, index: int) -> None:
        writes, d = self.waiting[index]
        self._save(writes).chainDeferred(d)

    def fail(self, index: int, error: Exception) -> None:
        self.waiting[index][1].errback(error)


def kinds(client: FakeClient) -> list[str]:
    return [m["type"] for m in client.take()]


class SaveThenShowTests(HarnessCase):
    def reader(self, h: Harness) -> tuple[Any, FakeClient]:
        session, client = h.connect()
        h.send(session, "subscribe", {"id": "s", "documentId": "d"})
        client.take()
        return session, client

    def state(self, h: Harness) -> dict[str, Any]:
        """What a newcomer's sync_request is told."""
        session, client = h.connect("192.0.2.99")
        h.send(session, "sync_request", {"id": "peek", "documentId": "d"})
        [response] = client.take()
        session.closed()
        return response["state"]

    def test_reader_during_slow_save_sees_only_confirmed_values(self) -> None:
        """
        While a write waits on storage, readers (a newcomer's sync_request, the subscribers'
        end-of-turn broadcast) see only what was confirmed before it; once saved, it is shown,
        broadcast and acknowledged.
        """
        h = self.harness()
        writer, writer_client = h.connect()
        h.send(writer, "delta", {"id": "w0", "documentId": "d", "delta": {"a": "confirmed"}})
        h.flush()
        _, reader_client = self.reader(h)
        held = HeldSaves(h)
        h.send(writer, "delta", {"id": "w1", "documentId": "d", "delta": {"a": "pending", "b": 1}})
        h.flush()
        self.assertEqual(self.state(h), {"a": "confirmed"})
        self.assertEqual(reader_client.take(), [])
        self.assertNotIn("ack", [m["type"] for m in writer_client.take() if m.get("messageId") == "w1"])
        held.release(0)
        h.flush()
        self.assertEqual(self.state(h), {"a": "pending", "b": 1})
        self.assertEqual([(m["field"], m["value"]) for m in reader_client.take()], [("a", "pending"), ("b", 1)])
        self.assertIn("ack", kinds(writer_client))

    def test_failing_save_with_a_concurrent_writer(self) -> None:
        """
        Two writers' saves are in flight; the later one is saved, the earlier one fails: only
        the saved value is ever shown or broadcast, and the failed writer gets
        STORAGE_UNAVAILABLE instead of an ack.
        """
        h = self.harness()
        _, reader_client = self.reader(h)
        held = HeldSaves(h)
        first, first_client = h.connect()
        second, second_client = h.connect()
        h.send(first, "delta", {"id": "w1", "documentId": "d", "delta": {"a": "lost"}})
        h.send(second, "delta", {"id": "w2", "documentId": "d", "delta": {"a": "kept"}})
        held.release(1)
        held.fail(0, StorageUnavailable("down"))
        h.flush()
        self.assertEqual(self.state(h), {"a": "kept"})
        self.assertEqual([(m["field"], m["value"]) for m in reader_client.take()], [("a", "kept")])
        [error] = first_client.of_type("error")
        self.assertEqual(error["details"], {"documentId": "d", "code": "STORAGE_UNAVAILABLE"})
        self.assertEqual(first_client.of_type("ack"), [])
        self.assertEqual(len(second_client.of_type("ack")), 1)

    def test_concurrent_writes_later_stamp_wins_whichever_saves_first(self) -> None:
        """
        Of two writes in flight to one field, the one processed later wins even when the
        earlier one's save completes last (its stamp was promised to be outbid).
        """
        h = self.harness()
        held = HeldSaves(h)
        first, _ = h.connect()
        second, _ = h.connect()
        h.send(first, "delta", {"id": "w1", "documentId": "d", "delta": {"a": "earlier"}})
        h.send(second, "delta", {"id": "w2", "documentId": "d", "delta": {"a": "later"}})
        held.release(1)
        held.release(0)
        self.assertEqual(self.state(h), {"a": "later"})
        self.assertEqual(self.successResultOf(h.storage.load("d")).fields, {"a": "later"})

    def test_failed_text_save_in_a_mixed_batch_applies_nothing(self) -> None:
        """
        A delta_batch with fields, text and a counter op whose save fails leaves nothing
        applied, relayed or broadcast: not the fields, not the text, not the op.
        """
        h = self.harness()
        _, reader_client = self.reader(h)
        writer, writer_client = h.connect()
        h.storage.save = lambda writes: fail(StorageUnavailable("down"))  # type: ignore[method-assign]
        ops = [
            {"type": "set", "field": "a", "value": 1},
            {"type": "text-state", "state": text_state("alice", "Hello")},
            {"type": "counter", "operation": "increment", "value": 1},
        ]
        h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": ops})
        h.flush()
        self.assertEqual([m["details"]["code"] for m in writer_client.of_type("error")], ["STORAGE_UNAVAILABLE"])
        self.assertEqual(reader_client.take(), [])
        doc = h.server.engine.registry.peek("d")
        self.assertEqual((doc.fields, vector(doc.clock), doc.text), ({}, {}, None))

    def test_timed_out_save_that_commits_late_is_seen_after_the_reread(self) -> None:
        """
        A save that times out has an unknown outcome: the client gets STORAGE_UNAVAILABLE, the
        document is not changed by guess but marked stale, and re-read before it is served; when
        the save really ends (it committed after all), the document is re-read again, and the
        write shown and broadcast.
        """
        h = self.harness()
        _, reader_client = self.reader(h)
        writer, writer_client = h.connect()
        settled: Deferred = Deferred()
        really_save = h.storage.save
        attempted: list[Sequence[DocumentWrites]] = []

        def timing_out(writes: Sequence[DocumentWrites]) -> Deferred:
            attempted.append(writes)
            return fail(StorageTimeout("slow", settled))

        h.storage.save = timing_out  # type: ignore[method-assign]
        h.send(writer, "delta", {"id": "w", "documentId": "d", "delta": {"a": "late"}})
        [error] = writer_client.of_type("error")
        self.assertEqual(error["details"]["code"], "STORAGE_UNAVAILABLE")
        doc = h.server.engine.registry.peek("d")
        self.assertTrue(doc.stale)
        self.assertEqual(doc.fields, {})

        h.storage.save = really_save  # type: ignore[method-assign]
        self.successResultOf(really_save(attempted[0]))  # the late commit
        settled.callback(None)
        h.flush()
        self.assertFalse(doc.stale)
        self.assertEqual(doc.fields, {"a": "late"})
        self.assertEqual([(m["field"], m["value"]) for m in reader_client.take()], [("a", "late")])

    def test_stale_document_reread_before_it_is_served(self) -> None:
        """A stale document's next reader gets what storage holds, not the cache's guess."""
        h = self.harness()
        writer, _ = h.connect()
        h.send(writer, "delta", {"id": "w", "documentId": "d", "delta": {"a": 1}})
        doc = h.server.engine.registry.peek("d")
        h.storage.save([DocumentWrites("d", [FieldWrite("b", 2, "elsewhere", 1, h.server.now_ms() + 5)])])
        doc.stale = True
        self.assertEqual(self.state(h), {"a": 1, "b": 2})
        self.assertFalse(doc.stale)


class TextMergeTests(HarnessCase):
    def test_concurrent_edits_and_late_joiner(self) -> None:
        """
        Two clients edit one text concurrently (each from the same base); the stored text is the
        merge of both, never the last one received, and a client joining later gets it whole.
        """
        h = self.harness()
        base = text_state("alice", "Hello World")
        alice_edit = FugueText.parse(base)
        bob_edit = FugueText.parse(base)
        # Each appends a block of its own after the base (as two replicas typing at once would).
        alice_edit.merge(FugueText.parse(text_state("alice", "Y", clock=11)))
        bob_edit.merge(FugueText.parse(text_state("bob", "X", clock=11)))
        alice, _ = h.connect()
        bob, _ = h.connect()
        for session, state in ((alice, base), (alice, alice_edit.to_json()), (bob, bob_edit.to_json())):
            h.send(session, "delta_batch", {"id": "b", "documentId": "t", "deltas": [{"type": "text-state", "state": state}]})
        expected = FugueText.parse(base)
        expected.merge(alice_edit)
        expected.merge(bob_edit)
        late, late_client = h.connect()
        h.send(late, "subscribe", {"id": "s", "documentId": "t"})
        response = late_client.of_type("sync_response")[0]
        self.assertEqual(FugueText.parse(response["textState"]).text(), expected.text())
        self.assertIn("X", expected.text())
        self.assertIn("Y", expected.text())
        self.assertEqual(self.successResultOf(h.storage.load("t")).text.state.text(), expected.text())
