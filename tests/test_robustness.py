"""
Hostile or unlucky input that must not hurt anyone else: found in review, kept fixed here.
"""

from __future__ import annotations

import base64
from typing import Any

import jwt
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from synckit.chunks import ChunkAssembler, ChunkError
from synckit.sync.document import MAX_COUNTER, Document
from tests.helpers import SECRET, Harness


class ClockBoundTests(SynchronousTestCase):
    def test_huge_client_counter_ignored(self) -> None:
        """A clock entry beyond 2**53-1 is ignored, so ticking it cannot make the document unencodable."""
        doc = Document("d")
        doc.merge_clock({"conn-1": 2**64 - 1, "ok": MAX_COUNTER})
        self.assertEqual(doc.clock, {"ok": MAX_COUNTER})

    def test_poisoning_attempt_leaves_document_usable(self) -> None:
        """After a client sends an enormous counter for a writer, that writer's next write still syncs."""
        h = Harness()
        writer, writer_client = h.connect()
        h.send(writer, "sync_request", {"id": "s", "documentId": "d"})
        h.send(writer, "delta", {"id": "a", "documentId": "d", "delta": {"x": 1}, "vectorClock": {writer.id: 2**64 - 1}})
        h.send(writer, "delta", {"id": "b", "documentId": "d", "delta": {"x": 2}, "vectorClock": {}})
        h.flush()
        reader, reader_client = h.connect()
        h.send(reader, "sync_request", {"id": "r", "documentId": "d"})
        [response] = reader_client.of_type("sync_response")
        self.assertEqual(response["state"], {"x": 2})
        self.assertEqual([m["value"] for m in writer_client.of_type("delta")], [2])


class FlushIsolationTests(SynchronousTestCase):
    def test_one_failing_document_does_not_stop_the_others(self) -> None:
        """If sending one document's broadcast fails, the other documents' broadcasts still go out."""
        h = Harness()
        bad, bad_client = h.connect()
        good, good_client = h.connect()
        h.send(bad, "sync_request", {"id": "s", "documentId": "bad"})
        h.send(good, "sync_request", {"id": "s", "documentId": "good"})
        h.send(bad, "delta", {"id": "w1", "documentId": "bad", "delta": {"k": 1}, "vectorClock": {}})

        def explode(frame: Any, binary: bool) -> None:
            raise RuntimeError("transport exploded")

        bad_client.send_frame = explode  # type: ignore[method-assign]
        h.send(good, "delta", {"id": "w2", "documentId": "good", "delta": {"k": 2}, "vectorClock": {}})
        h.flush()
        self.assertEqual([m["value"] for m in good_client.of_type("delta")], [2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SlowStorage:
    """MemoryStorage whose loads wait until the test releases them."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.pending: list[Deferred] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, doc_id: str) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append(d)
        return d


class ClosedSessionTests(SynchronousTestCase):
    def test_no_resubscription_after_close(self) -> None:
        """A sync_request still loading when its connection closes does not subscribe the dead session."""
        h = Harness()
        slow = SlowStorage(h.storage)
        h.server.engine.registry._storage = slow
        session, _ = h.connect()
        h.send(session, "sync_request", {"id": "s", "documentId": "d"})
        session.closed()
        slow.pending[0].callback(None)
        self.assertEqual(h.server.engine.registry.subscribers("d"), set())
        self.assertEqual(session.subscriptions, set())


class ChunkBudgetTests(SynchronousTestCase):
    def chunk(self, chunk_id: str, index: int, total: int, data: bytes) -> dict[str, Any]:
        return {"chunkId": chunk_id, "chunkIndex": index, "totalChunks": total, "data": base64.b64encode(data).decode()}

    def test_open_sets_are_capped(self) -> None:
        """A connection cannot open more than max_sets chunk sets at once."""
        assembler = ChunkAssembler(max_sets=2)
        assembler.add(self.chunk("a", 0, 1000, b"x"), 0)
        assembler.add(self.chunk("b", 0, 1000, b"x"), 0)
        self.assertRaises(ChunkError, assembler.add, self.chunk("c", 0, 1000, b"x"), 0)

    def test_byte_budget_spans_all_sets(self) -> None:
        """The byte budget counts every open set together; the set that breaks it is dropped."""
        assembler = ChunkAssembler(max_bytes=10)
        assembler.add(self.chunk("a", 0, 2, b"123456"), 0)
        self.assertRaises(ChunkError, assembler.add, self.chunk("b", 0, 2, b"123456"), 0)
        # "a" is still there and can complete; "b" was dropped and its bytes released.
        self.assertEqual(assembler.add(self.chunk("a", 1, 2, b"7"), 0), b"1234567")
        self.assertFalse(assembler)

    def test_announced_size_costs_nothing(self) -> None:
        """Announcing 1000 chunks allocates nothing until they arrive."""
        assembler = ChunkAssembler()
        assembler.add(self.chunk("a", 999, 1000, b""), 0)
        self.assertEqual(len(assembler._sets["a"].parts), 1)


class TokenTests(SynchronousTestCase):
    def test_numeric_subject_accepted(self) -> None:
        """A token whose sub or jti is not a string authenticates, as with jsonwebtoken."""
        h = Harness(auth_required=True)
        now = int(h.clock.seconds())
        token = jwt.encode({"userId": "u1", "sub": 42, "jti": 7, "iat": now, "exp": now + 60}, SECRET, algorithm="HS256")
        session, client = h.connect()
        h.send(session, "auth", {"id": "a", "token": token})
        [reply] = client.take()
        self.assertEqual((reply["type"], reply["userId"]), ("auth_success", "u1"))
        self.assertIsNone(client.closed)


class PlainGetTests(SynchronousTestCase):
    def test_no_status_page(self) -> None:
        """The WebSocket factory does not serve Autobahn's HTML status page for a plain GET /ws."""
        from synckit.websocket import SyncFactory

        h = Harness()
        self.assertFalse(SyncFactory(h.server, h.server.config).webStatus)


