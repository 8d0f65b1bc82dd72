"""
The per-connection message pipeline (docs/protocol.md sections 2 and 3): decoding errors,
the allow-list, the size and rate limits, pongs, reply framing, strict in-order handling while
storage is waiting, unexpected handler failures, and chunk reassembly.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail

from synckit.session import Session
from tests.helpers import FakeClient, Harness, HarnessCase, binary, text

#: the timestamp helpers.binary puts in every frame header
HEADER_TS = 1_700_000_000_000


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages]


def errors(messages: list[dict[str, Any]]) -> list[tuple[str, Optional[dict[str, Any]]]]:
    """The (error, details) of every error message, C{None} where details are absent."""
    return [(m["error"], m.get("details")) for m in messages if m["type"] == "error"]


class PipelineTestCase(HarnessCase):

    def assertPong(self, h: Harness, session: Session, client: FakeClient) -> None:
        """The connection still works: a ping is answered with exactly one pong."""
        h.send(session, "ping", {"id": "alive?"})
        self.assertEqual(kinds(client.take()), ["pong"])
        self.assertIsNone(client.closed)


class MalformedInputTests(PipelineTestCase):
    def test_undecodable_frames(self) -> None:
        """
        Empty frames, short headers, truncated payloads, unknown type codes, invalid JSON and JSON
        without type/id/timestamp each get "Invalid message format" without details, and the
        connection stays open and usable after every one of them.
        """
        h = self.harness()
        session, client = h.connect()
        whole = binary("ping", {"id": "p"})
        garbage = [
            (b"", True),
            (b"\x00garbage", True),
            (whole[:12], True),
            (whole[:-1], True),
            (struct.pack(">BqI", 0x99, 0, 2) + b"{}", True),
            (struct.pack(">BqI", 0x30, 0, 5) + b"{nope", True),
            (b"{not json", False),
            (b'{"type":"ping","timestamp":1}', False),
            (b'{"type":"ping","id":"x","timestamp":0}', False),
        ]
        for data, is_binary in garbage:
            session.receive(data, is_binary)
            messages = client.take()
            self.assertEqual(kinds(messages), ["error"], data)
            self.assertEqual(messages[0]["error"], "Invalid message format", data)
            self.assertNotIn("details", messages[0], data)
            self.assertIsNone(client.closed)
        self.assertPong(h, session, client)

    def test_server_only_types_refused(self) -> None:
        """
        Types only the server sends are refused by the allow-list with
        "Invalid message type: <type>" and code INVALID_MESSAGE, and nothing else happens.
        """
        h = self.harness()
        session, client = h.connect()
        for kind in ("sync_response", "error", "auth_success", "auth_error", "awareness_state", "sync_step2"):
            h.send(session, kind, {"documentId": "d"})
            self.assertEqual(
                errors(client.take()), [(f"Invalid message type: {kind}", {"code": "INVALID_MESSAGE"})], kind
            )
        self.assertEqual(session.subscriptions, set())
        self.assertPong(h, session, client)

    def test_unknown_json_types_refused(self) -> None:
        """A JSON message of an unknown type (or ``disconnect``) gets the allow-list error."""
        h = self.harness()
        session, client = h.connect()
        for kind in ("bogus", "disconnect", "delta_batch_chunk_x"):
            session.receive(text(kind, documentId="d"), False)
            self.assertEqual(
                errors(client.take()), [(f"Invalid message type: {kind}", {"code": "INVALID_MESSAGE"})], kind
            )
        self.assertIsNone(client.closed)


class SizeLimitTests(PipelineTestCase):
    @staticmethod
    def delta(value: str) -> tuple[dict[str, Any], int]:
        """A delta payload and the length of its decoded message re-serialised as compact JSON."""
        payload = {"id": "big", "documentId": "d", "delta": {"k": value}, "vectorClock": {}}
        decoded = {"type": "delta", "timestamp": HEADER_TS, **payload}
        return payload, len(json.dumps(decoded, separators=(",", ":"), ensure_ascii=False))

    def test_message_too_large(self) -> None:
        """
        A message whose re-serialised JSON is longer than max_message_size gets
        "Message too large (<n> bytes, max <limit>)" with code INVALID_MESSAGE and is not applied.
        """
        h = self.harness(max_message_size=200)
        session, client = h.connect()
        payload, length = self.delta("x" * 300)
        h.send(session, "delta", payload)
        self.assertEqual(
            errors(client.take()), [(f"Message too large ({length} bytes, max 200)", {"code": "INVALID_MESSAGE"})]
        )
        h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(client.of_type("sync_response")[0]["state"], {})
        self.assertIsNone(client.closed)

    def test_size_boundary(self) -> None:
        """A message exactly at the limit is accepted; one character more is refused."""
        payload, length = self.delta("x" * 50)
        h = self.harness(max_message_size=length)
        session, client = h.connect()
        h.send(session, "delta", payload)
        self.assertEqual(kinds(client.take()), ["ack"])
        payload, longer = self.delta("x" * 51)
        h.send(session, "delta", payload)
        self.assertEqual(
            errors(client.take()),
            [(f"Message too large ({longer} bytes, max {length})", {"code": "INVALID_MESSAGE"})],
        )

    def test_non_ascii_measured_in_characters(self) -> None:
        """The limit counts characters of JSON, not UTF-8 bytes: 40 three-byte characters count 40."""
        payload, length = self.delta("\u20ac" * 40)
        h = self.harness(max_message_size=length)
        session, client = h.connect()
        h.send(session, "delta", payload)
        self.assertEqual(kinds(client.take()), ["ack"])


class RateLimitTests(PipelineTestCase):
    RATE_LIMITED = ("Too many messages. Please slow down.", {"code": "RATE_LIMIT_EXCEEDED"})

    def test_fourth_message_dropped(self) -> None:
        """
        With a limit of 3, acks, pongs and connect count like any message: the 4th message gets
        RATE_LIMIT_EXCEEDED and is dropped (no sync_response, no subscription), and the
        connection stays open.
        """
        h = self.harness(max_messages_per_minute=3)
        session, client = h.connect()
        h.send(session, "ack", {"messageId": "m"})
        h.send(session, "pong", {})
        session.receive(text("connect"), False)
        self.assertEqual(client.take(), [])
        h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(errors(client.take()), [self.RATE_LIMITED])
        self.assertEqual(session.subscriptions, set())
        self.assertIsNone(client.closed)

    def test_rejected_do_not_count_and_window_slides(self) -> None:
        """
        Refused messages are not recorded: once the accepted ones are more than 60 s old the
        full limit is available again, however many were refused meanwhile.
        """
        h = self.harness(max_messages_per_minute=3)
        session, client = h.connect()
        for _ in range(3):
            h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(kinds(client.take()), ["sync_response"] * 3)
        h.clock.advance(30)
        for _ in range(5):
            h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(errors(client.take()), [self.RATE_LIMITED] * 5)
        h.clock.advance(31)
        for _ in range(3):
            h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(kinds(client.take()), ["sync_response"] * 3)
        h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(errors(client.take()), [self.RATE_LIMITED])

    def test_limit_is_per_connection(self) -> None:
        """One connection's exhausted limit does not affect another connection from the same address."""
        h = self.harness(max_messages_per_minute=1)
        first, first_client = h.connect()
        second, second_client = h.connect()
        h.send(first, "ack", {})
        h.send(first, "ack", {})
        self.assertEqual(errors(first_client.take()), [self.RATE_LIMITED])
        h.send(second, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(kinds(second_client.take()), ["sync_response"])

    def test_rate_limited_ping_still_pongs(self) -> None:
        """A rate-limited ping gets the rate-limit error first and then its pong."""
        h = self.harness(max_messages_per_minute=1)
        session, client = h.connect()
        h.send(session, "ping", {})
        self.assertEqual(kinds(client.take()), ["pong"])
        h.send(session, "ping", {})
        messages = client.take()
        self.assertEqual(kinds(messages), ["error", "pong"])
        self.assertEqual(errors(messages), [self.RATE_LIMITED])


class PingAndIgnoredTests(PipelineTestCase):
    def test_ping_without_auth(self) -> None:
        """A ping needs no authentication: it is answered with a pong carrying a fresh id."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "ping", {"id": "p1"})
        [pong] = client.take()
        self.assertEqual(pong["type"], "pong")
        self.assertNotEqual(pong["id"], "p1")
        self.assertEqual(set(pong), {"type", "id", "timestamp"})

    def test_refused_ping_type_still_pongs(self) -> None:
        """A ping that fails the size check is still answered, after the error."""
        h = self.harness(max_message_size=50)
        session, client = h.connect()
        h.send(session, "ping", {"padding": "x" * 100})
        messages = client.take()
        self.assertEqual(kinds(messages), ["error", "pong"])
        self.assertTrue(messages[0]["error"].startswith("Message too large"))

    def test_client_ack_pong_connect_ignored(self) -> None:
        """
        Client ack, pong, connect and snapshot requests are accepted silently, even before
        authentication: no reply, no close.
        """
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "ack", {"messageId": "m1"})
        h.send(session, "pong", {})
        session.receive(text("connect"), False)
        session.receive(text("snapshot_request", documentId="d"), False)
        session.receive(text("snapshot_upload", documentId="d"), False)
        self.assertEqual(client.take(), [])
        self.assertIsNone(client.closed)
        self.assertFalse(session.authenticated)
        self.assertPong(h, session, client)


class FramingTests(PipelineTestCase):
    def test_binary_until_text_frame(self) -> None:
        """
        Replies are binary frames until the first text frame arrives, JSON text frames from then
        on, even to later binary input; JSON inside a binary frame does not switch.
        """
        h = self.harness()
        session, client = h.connect()
        h.send(session, "ping", {})
        session.receive(text("ping"), True)  # JSON, but in a binary frame
        self.assertEqual([is_binary for _, is_binary in client.frames], [True, True])
        client.take()
        session.receive(text("ping"), False)
        h.send(session, "ping", {})
        self.assertEqual([is_binary for _, is_binary in client.frames], [False, False])
        reply = json.loads(client.frames[0][0])
        self.assertEqual(reply["type"], "pong")
        self.assertIn("id", reply)
        self.assertIn("timestamp", reply)

    def test_text_session_gets_text_broadcasts(self) -> None:
        """A connection switched to JSON also receives broadcasts as JSON text frames."""
        h = self.harness()
        reader, reader_client = h.connect()
        writer, _ = h.connect()
        reader.receive(text("sync_request", id="r", documentId="d"), False)
        reader_client.take()
        h.send(writer, "delta", {"id": "w", "documentId": "d", "delta": {"k": 1}, "vectorClock": {}})
        h.flush()
        [(data, is_binary)] = reader_client.frames
        self.assertFalse(is_binary)
        self.assertEqual(json.loads(data)["field"], "k")

    def test_generated_id_echoed(self) -> None:
        """
        Binary input without an id gets a server-generated id, which the reply's correlation
        field (sync_response.requestId, ack.messageId) carries; the reply's own id is fresh.
        """
        h = self.harness()
        issued: list[str] = []
        real_ids = h.server.ids

        def ids(now: int) -> str:
            issued.append(real_ids(now))
            return issued[-1]

        self.patch(h.server, "ids", ids)
        session, client = h.connect()
        h.send(session, "sync_request", {"documentId": "d"})
        [response] = client.take()
        self.assertEqual(response["requestId"], issued[0])
        self.assertNotEqual(response["id"], response["requestId"])
        issued.clear()
        h.send(session, "delta", {"documentId": "d", "delta": {"k": 1}, "vectorClock": {}})
        [ack] = client.take()
        self.assertEqual(ack["messageId"], issued[0])
        self.assertNotEqual(ack["id"], ack["messageId"])

    def test_payload_id_echoed(self) -> None:
        """A payload id is the correlation id, in binary and JSON input alike."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "sync_request", {"id": "req-7", "documentId": "d"})
        self.assertEqual(client.take()[0]["requestId"], "req-7")
        session.receive(text("sync_request", id="req-8", documentId="d"), False)
        self.assertEqual(client.take()[0]["requestId"], "req-8")


class OrderingTests(PipelineTestCase):
    def pending_storage(self, h: Harness) -> list[Deferred]:
        """Make storage writes wait until the test fires them; returns the waiting Deferreds."""
        waiting: list[Deferred] = []

        def save(writes: Any) -> Deferred:
            d: Deferred = Deferred()
            waiting.append(d)
            return d

        self.patch(h.storage, "save", save)
        return waiting

    def test_messages_wait_for_storage(self) -> None:
        """
        While a delta waits on storage, the connection's later messages queue behind it: the
        second delta does not even reach storage, and nothing is answered until the first write
        completes; then everything is answered in arrival order.
        """
        h = self.harness()
        waiting = self.pending_storage(h)
        session, client = h.connect()
        h.send(session, "delta", {"id": "w1", "documentId": "d", "delta": {"a": 1}, "vectorClock": {}})
        h.send(session, "delta", {"id": "w2", "documentId": "d", "delta": {"a": 2}, "vectorClock": {}})
        h.send(session, "ping", {"id": "p"})
        self.assertEqual(client.take(), [])
        self.assertEqual(len(waiting), 1)
        waiting[0].callback({})
        [ack] = client.take()
        self.assertEqual((ack["type"], ack["messageId"]), ("ack", "w1"))
        self.assertEqual(len(waiting), 2)
        waiting[1].callback({})
        messages = client.take()
        self.assertEqual(kinds(messages), ["ack", "pong"])
        self.assertEqual(messages[0]["messageId"], "w2")

    def test_read_queued_behind_write(self) -> None:
        """A sync_request queued behind a waiting delta is answered after it, with the write in its state."""
        h = self.harness()
        waiting = self.pending_storage(h)
        session, client = h.connect()
        h.send(session, "delta", {"id": "w1", "documentId": "d", "delta": {"a": 1}, "vectorClock": {}})
        h.send(session, "sync_request", {"id": "r1", "documentId": "d"})
        self.assertEqual(client.take(), [])
        waiting[0].callback({})
        messages = client.take()
        self.assertEqual(kinds(messages), ["ack", "sync_response"])
        self.assertEqual(messages[1]["state"], {"a": 1})

    def test_other_connections_not_blocked(self) -> None:
        """One connection waiting on storage does not hold up another connection's messages."""
        h = self.harness()
        waiting = self.pending_storage(h)
        writer, writer_client = h.connect()
        other, other_client = h.connect()
        h.send(writer, "delta", {"id": "w1", "documentId": "d", "delta": {"a": 1}, "vectorClock": {}})
        h.send(other, "ping", {})
        self.assertEqual(kinds(other_client.take()), ["pong"])
        self.assertEqual(writer_client.take(), [])
        waiting[0].callback({})
        self.assertEqual(kinds(writer_client.take()), ["ack"])

    def test_failed_wait_releases_queue(self) -> None:
        """
        A storage write that fails later gives "Delta application failed" and no ack, and the
        messages queued behind it are then handled.
        """
        h = self.harness()
        waiting = self.pending_storage(h)
        session, client = h.connect()
        h.send(session, "delta", {"id": "w1", "documentId": "d", "delta": {"a": 1}, "vectorClock": {}})
        h.send(session, "ping", {})
        waiting[0].errback(RuntimeError("disk on fire"))
        messages = client.take()
        self.assertEqual(kinds(messages), ["error", "pong"])
        self.assertEqual(errors(messages), [("Delta application failed", {"documentId": "d"})])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_close_drops_queued_messages(self) -> None:
        """Messages queued behind a waiting handler are not handled once the connection is gone."""
        h = self.harness()
        waiting = self.pending_storage(h)
        session, client = h.connect()
        h.send(session, "delta", {"id": "w1", "documentId": "d", "delta": {"a": 1}, "vectorClock": {}})
        h.send(session, "delta", {"id": "w2", "documentId": "d", "delta": {"a": 2}, "vectorClock": {}})
        session.closed()
        waiting[0].callback({})
        self.assertEqual(len(waiting), 1)
        self.assertEqual(client.take(), [])


class HandlerFailureTests(PipelineTestCase):
    def test_storage_raising(self) -> None:
        """
        An exception escaping the delta handler gives "Delta application failed" with the
        document id, no ack, a logged failure, and a connection that keeps working.
        """
        h = self.harness()

        def save(writes: Any) -> Deferred:
            raise RuntimeError("disk on fire")

        self.patch(h.storage, "save", save)
        session, client = h.connect()
        h.send(session, "delta", {"id": "w", "documentId": "doc-9", "delta": {"a": 1}, "vectorClock": {}})
        messages = client.take()
        self.assertEqual(errors(messages), [("Delta application failed", {"documentId": "doc-9"})])
        self.assertEqual(client.of_type("ack"), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertPong(h, session, client)

    def test_storage_failed_deferred(self) -> None:
        """An already-failed storage Deferred is reported the same way as a raised exception."""
        h = self.harness()
        self.patch(h.storage, "save", lambda writes: fail(RuntimeError("no")))
        session, client = h.connect()
        h.send(session, "delta", {"id": "w", "documentId": "d", "delta": {"a": 1}, "vectorClock": {}})
        self.assertEqual(errors(client.take()), [("Delta application failed", {"documentId": "d"})])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertPong(h, session, client)

    def test_load_failure_in_sync_request(self) -> None:
        """A storage load failure in sync_request gives "Sync request failed" with the document id."""
        h = self.harness()
        self.patch(h.storage, "load", lambda doc_id: fail(RuntimeError("no")))
        session, client = h.connect()
        h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(errors(client.take()), [("Sync request failed", {"documentId": "d"})])
        self.assertEqual(session.subscriptions, set())
        self.flushLoggedErrors(RuntimeError)
        self.assertPong(h, session, client)


def chunked(frame: bytes, parts: int, chunk_id: str = "c1") -> list[dict[str, Any]]:
    """C{frame} cut into C{parts} delta_batch_chunk payloads, each piece base64-encoded."""
    size = -(-len(frame) // parts)
    pieces = [frame[i * size : (i + 1) * size] for i in range(parts)]
    return [
        {"chunkId": chunk_id, "totalChunks": parts, "chunkIndex": i, "data": base64.b64encode(p).decode("ascii")}
        for i, p in enumerate(pieces)
    ]


class ChunkTests(PipelineTestCase):
    def test_chunked_delta_applied_and_acked(self) -> None:
        """
        A delta cut into chunks is applied and acked once the last chunk arrives; the chunks
        themselves get no reply.
        """
        h = self.harness()
        session, client = h.connect()
        frame = binary("delta", {"id": "big", "documentId": "d", "delta": {"k": "v" * 40}, "vectorClock": {}})
        chunks = chunked(frame, 3)
        for chunk in chunks[:-1]:
            h.send(session, "delta_batch_chunk", chunk)
            self.assertEqual(client.take(), [])
        h.send(session, "delta_batch_chunk", chunks[-1])
        [ack] = client.take()
        self.assertEqual((ack["type"], ack["messageId"]), ("ack", "big"))
        reader, reader_client = h.connect()
        h.send(reader, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(reader_client.take()[0]["state"], {"k": "v" * 40})

    def test_chunks_do_not_count_toward_rate_limit(self) -> None:
        """
        Chunks are not rate-limited; the reassembled message counts once: with a limit of 2,
        five chunks and their delta leave exactly one more message allowed.
        """
        h = self.harness(max_messages_per_minute=2)
        session, client = h.connect()
        frame = binary("delta", {"id": "big", "documentId": "d", "delta": {"k": 1}, "vectorClock": {}})
        for chunk in chunked(frame, 5):
            h.send(session, "delta_batch_chunk", chunk)
        self.assertEqual(kinds(client.take()), ["ack"])
        h.send(session, "ping", {})
        self.assertEqual(kinds(client.take()), ["pong"])
        h.send(session, "ping", {})
        self.assertEqual(kinds(client.take()), ["error", "pong"])

    def test_reassembled_ping_gets_no_pong(self) -> None:
        """
        A reassembled ping is dispatched (it uses up the limit of 1) but gets no pong; the next
        ping is then rate-limited and answered with error and pong.
        """
        h = self.harness(max_messages_per_minute=1)
        session, client = h.connect()
        for chunk in chunked(binary("ping", {"id": "p"}), 2):
            h.send(session, "delta_batch_chunk", chunk)
        self.assertEqual(client.take(), [])
        h.send(session, "ping", {})
        messages = client.take()
        self.assertEqual(kinds(messages), ["error", "pong"])
        self.assertEqual(messages[0]["details"], {"code": "RATE_LIMIT_EXCEEDED"})

    def test_undecodable_reassembly_is_silent(self) -> None:
        """A reassembled chunk set that does not decode is dropped without any reply."""
        h = self.harness()
        session, client = h.connect()
        for chunk in chunked(b"\x00not a frame at all", 2):
            h.send(session, "delta_batch_chunk", chunk)
        self.assertEqual(client.take(), [])
        self.assertPong(h, session, client)

    def test_chunk_inside_chunks_refused(self) -> None:
        """A reassembled delta_batch_chunk is not reassembled again but fails the allow-list."""
        h = self.harness()
        session, client = h.connect()
        inner = binary("delta_batch_chunk", chunked(binary("ping", {}), 1, "inner")[0])
        for chunk in chunked(inner, 2):
            h.send(session, "delta_batch_chunk", chunk)
        self.assertEqual(
            errors(client.take()), [("Invalid message type: delta_batch_chunk", {"code": "INVALID_MESSAGE"})]
        )

    def test_chunks_need_no_auth(self) -> None:
        """
        Chunks are stored before any auth check; the reassembled delta then goes through the
        handler's own checks and gets "Not authenticated".
        """
        h = self.harness(auth_required=True)
        session, client = h.connect()
        frame = binary("delta", {"id": "big", "documentId": "d", "delta": {"k": 1}, "vectorClock": {}})
        chunks = chunked(frame, 2)
        h.send(session, "delta_batch_chunk", chunks[0])
        self.assertEqual(client.take(), [])
        h.send(session, "delta_batch_chunk", chunks[1])
        self.assertEqual(errors(client.take()), [("Not authenticated", None)])


class InvalidMessageLimitTests(PipelineTestCase):
    def test_invalid_messages_answered_up_to_the_limit_then_closed(self) -> None:
        """
        Undecodable messages each get an error up to max-invalid-messages-per-minute; the next
        one gets "Too many invalid messages" and closes the connection (1008), and nothing more
        is answered.
        """
        h = self.harness(max_invalid_messages_per_minute=3)
        session, client = h.connect()
        for _ in range(3):
            session.receive(b"\x00", True)
        self.assertEqual(errors(client.take()), [("Invalid message format", None)] * 3)
        self.assertIsNone(client.closed)
        session.receive(b"\x00", True)
        session.receive(b"\x00", True)
        self.assertEqual(errors(client.take()), [("Too many invalid messages", {"code": "INVALID_MESSAGE"})])
        self.assertEqual(client.closed, (1008, "Too many invalid messages"))

    def test_invalid_message_window_slides(self) -> None:
        """The limit is per sliding minute: a minute later, invalid messages are answered again."""
        h = self.harness(max_invalid_messages_per_minute=2)
        session, client = h.connect()
        for _ in range(2):
            session.receive(b"\x00", True)
        h.clock.advance(61)
        for _ in range(2):
            session.receive(b"\x00", True)
        self.assertEqual(errors(client.take()), [("Invalid message format", None)] * 4)
        self.assertIsNone(client.closed)

    def test_decode_bounded_by_message_size_limit(self) -> None:
        """
        A message with more arrays than the size limit allows is refused as undecodable
        before it is parsed, in a frame or reassembled from chunks.
        """
        h = self.harness(max_message_size=1600)
        session, client = h.connect()
        wide = {"id": "w", "v": [[] for _ in range(200)]}
        h.send(session, "ping", wide)
        self.assertEqual(errors(client.take()), [("Invalid message format", None)])
        for chunk in chunked(binary("ping", wide), 2):
            h.send(session, "delta_batch_chunk", chunk)
        self.assertEqual(client.take(), [])
        h.send(session, "ping", {"id": "w", "v": [[] for _ in range(50)]})
        self.assertEqual(kinds(client.take()), ["pong"])


class ChunkMemoryTests(PipelineTestCase):
    def test_chunk_memory_shared_by_all_connections(self) -> None:
        """
        max-chunk-memory bounds the unfinished chunk sets of all connections together: a set
        that would go over it is dropped, and a closed connection's sets give their bytes back.
        """
        h = self.harness(max_chunk_memory=3200)
        frame = binary("delta", {"id": "big", "documentId": "d", "delta": {"k": "v" * 3000}, "vectorClock": {}})
        self.assertEqual(len(frame), 3084)
        first, first_client = h.connect()
        second, second_client = h.connect()
        for chunk in chunked(frame, 3, "a")[:2]:
            h.send(first, "delta_batch_chunk", chunk)  # 2056 bytes held
        h.send(second, "delta_batch_chunk", chunked(frame, 2, "b")[0])  # 3598 in all: dropped
        self.assertEqual(second_client.take(), [])
        first.closed()
        for chunk in chunked(frame, 2, "c"):
            h.send(second, "delta_batch_chunk", chunk)
        self.assertEqual(kinds(second_client.take()), ["ack"])

    def test_closed_session_lets_go(self) -> None:
        """A closed session drops its chunk sets and its connection, which a late handler could keep."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta_batch_chunk", chunked(binary("ping", {}), 2)[0])
        session.closed()
        self.assertIsNone(session.chunks)
        self.assertIsNot(session.client, client)
        session.close(1000, "again")
        self.assertIsNone(client.closed)
