"""
What each client message does, driven through a session with in-memory storage on a Clock: auth,
reads, writes, text merges and relays, counter/set/rich-text relays, RBAC, connection limits and
the /health statistics.  Where the code names a deliberate deviation from the reference, the test
checks our behaviour.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import jwt

from synckit.session import Session
from synckit.sync.fugue import FugueText
from tests.helpers import SECRET, FakeClient, Harness, HarnessCase, text_state, vector

#: the timestamp helpers.binary puts in every frame header
HEADER_TS = 1_700_000_000_000
EVERYONE = {"canRead": ["*"], "canWrite": ["*"], "isAdmin": False}
ADMIN = {"canRead": [], "canWrite": [], "isAdmin": True}
TOMBSTONE = {"__deleted": True}


def body(message: dict[str, Any]) -> dict[str, Any]:
    """A message without its envelope (type, id, timestamp), its clock without the server's entry."""
    out = {k: v for k, v in message.items() if k not in ("type", "id", "timestamp")}
    if isinstance(out.get("clock"), dict):
        out["clock"] = vector(out["clock"])
    return out


def errors(messages: list[dict[str, Any]]) -> list[tuple[str, Optional[dict[str, Any]]]]:
    return [(m["error"], m.get("details")) for m in messages if m["type"] == "error"]


def delta(doc_id: str, changes: dict[str, Any], id: str = "w", **extra: Any) -> dict[str, Any]:
    return {"id": id, "documentId": doc_id, "delta": changes, "vectorClock": {}, **extra}


class HandlerTestCase(HarnessCase):

    def one(self, client: FakeClient, kind: str) -> dict[str, Any]:
        """The single message received since the last take, which must be of C{kind}."""
        messages = client.take()
        self.assertEqual([m["type"] for m in messages], [kind], messages)
        return messages[0]

    def assertError(
        self, client: FakeClient, error: str, details: Optional[dict[str, Any]] = None
    ) -> None:
        """Exactly one message arrived: an error with this text and these details (or none)."""
        message = self.one(client, "error")
        self.assertEqual((message["error"], message.get("details")), (error, details))
        if details is None:
            self.assertNotIn("details", message)

    def state(self, h: Harness, doc_id: str) -> dict[str, Any]:
        """The document's state as a fresh connection's sync_request sees it."""
        session, client = h.connect("192.0.2.99")
        h.send(session, "sync_request", {"id": "peek", "documentId": doc_id})
        response = self.one(client, "sync_response")
        session.closed()
        return response["state"]

    def authed(self, h: Harness, permissions: Any, user: str = "u1", ip: str = "127.0.0.1") -> tuple[Session, FakeClient]:
        """A connection authenticated with a token carrying C{permissions}."""
        session, client = h.connect(ip)
        h.send(session, "auth", {"token": h.server.tokens.access_token(user, f"{user}@example.com", permissions)})
        self.one(client, "auth_success")
        return session, client


class AuthTests(HandlerTestCase):
    def test_expired_token_ends_the_session(self) -> None:
        """
        Once the token a session authenticated with expires, its next message gets "Token
        expired" and the connection is closed with 1008; nothing is handled.
        """
        h = self.harness(auth_required=True, jwt_expires_in=60)
        session, client = self.authed(h, EVERYONE)
        h.clock.advance(59)
        h.send(session, "ping", {})
        self.one(client, "pong")
        h.clock.advance(1)
        h.send(session, "delta", delta("d", {"a": 1}))
        self.assertError(client, "Token expired", {"code": "AUTH_REQUIRED"})
        self.assertEqual(client.closed, (1008, "Token expired"))
        self.assertIsNone(h.server.engine.registry.peek("d"))

    def test_idle_session_closed_when_its_token_expires(self) -> None:
        """A session that sends nothing is closed by housekeeping once its token has expired."""
        h = self.harness(auth_required=True, jwt_expires_in=60)
        session, client = self.authed(h, EVERYONE)
        h.clock.advance(30)
        h.server.housekeeping()
        self.assertIsNone(client.closed)
        h.clock.advance(30)
        h.server.housekeeping()
        self.assertEqual(client.closed, (1008, "Token expired"))

    def test_anonymous_on_connect(self) -> None:
        """With auth off, a connection is authenticated as anonymous-<ip> before sending anything."""
        h = self.harness()
        session, client = h.connect("10.1.2.3")
        self.assertTrue(session.authenticated)
        self.assertEqual(session.identity.user_id, "anonymous-10.1.2.3")
        self.assertFalse(session.identity.permissions.is_admin)
        h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.one(client, "sync_response")

    def test_auth_required_starts_unauthenticated(self) -> None:
        """With auth on, a new connection is not authenticated and has no identity."""
        h = self.harness(auth_required=True)
        session, _ = h.connect()
        self.assertFalse(session.authenticated)
        self.assertIsNone(session.identity)

    def test_credentialless_auth_when_disabled(self) -> None:
        """With auth off, auth without credentials answers auth_success as "anonymous" with */* rights."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "auth", {"id": "a1"})
        success = self.one(client, "auth_success")
        self.assertEqual(body(success), {"userId": "anonymous", "permissions": EVERYONE})
        self.assertNotEqual(success["id"], "a1")
        self.assertEqual(session.identity.user_id, "anonymous")
        self.assertIsNone(client.closed)

    def test_valid_token(self) -> None:
        """A valid JWT authenticates as its userId claim; auth_success echoes its permissions claim."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        claim = {"canRead": ["doc-a"], "canWrite": [], "isAdmin": False, "extra": 1}
        h.send(session, "auth", {"token": h.server.tokens.access_token("user-42", "a@example.com", claim)})
        self.assertEqual(body(self.one(client, "auth_success")), {"userId": "user-42", "permissions": claim})
        self.assertTrue(session.authenticated)
        self.assertEqual(session.identity.user_id, "user-42")

    def test_token_other_algorithms(self) -> None:
        """Tokens signed with HS512 by another issuer of the same secret are accepted."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        now = int(h.clock.seconds())
        token = jwt.encode({"userId": "x", "permissions": ADMIN, "iat": now, "exp": now + 60}, SECRET, algorithm="HS512")
        h.send(session, "auth", {"token": token})
        self.assertEqual(self.one(client, "auth_success")["userId"], "x")

    def assertAuthFailed(self, h: Harness, token: str) -> None:
        """The token gets auth_error and a 1008 close, the identity is unchanged, and nothing more is handled."""
        session, client = h.connect()
        before = session.identity
        h.send(session, "auth", {"token": token})
        self.assertEqual(body(self.one(client, "auth_error")), {"error": "Authentication failed"})
        self.assertEqual(client.closed, (1008, "Authentication failed"))
        self.assertIs(session.identity, before)
        # Nothing more is handled on a closed connection.
        h.send(session, "ping", {})
        self.assertEqual(client.take(), [])

    def test_invalid_tokens_close(self) -> None:
        """
        A garbage token, a wrongly signed one and an unsigned (alg none) one each get auth_error
        "Authentication failed" and a 1008 close, even with auth off.
        """
        h = self.harness()
        now = int(h.clock.seconds())
        claims = {"userId": "x", "permissions": ADMIN, "iat": now, "exp": now + 60}
        self.assertAuthFailed(h, "not-a-jwt")
        self.assertAuthFailed(h, jwt.encode(claims, "another-secret-that-is-long-enough!!", algorithm="HS256"))
        self.assertAuthFailed(h, jwt.encode(claims, "", algorithm="none"))

    def test_expired_token(self) -> None:
        """A token is valid until one second before exp, and refused from exp on (zero tolerance)."""
        h = self.harness(auth_required=True, jwt_expires_in=3600)
        token = h.server.tokens.access_token("u1", None, EVERYONE)
        h.clock.advance(3599)
        session, client = h.connect()
        h.send(session, "auth", {"token": token})
        self.one(client, "auth_success")
        h.clock.advance(1)
        self.assertAuthFailed(h, token)

    def test_expired_token_with_auth_disabled(self) -> None:
        """An expired token fails and closes the connection even when auth is off."""
        h = self.harness(jwt_expires_in=60)
        token = h.server.tokens.access_token("u1", None, EVERYONE)
        h.clock.advance(61)
        self.assertAuthFailed(h, token)

    def test_auth_required_without_credentials(self) -> None:
        """
        With auth on, auth without credentials gets error "Authentication required" with code
        AUTH_REQUIRED (not auth_error), then a 1008 close.
        """
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "auth", {})
        self.assertError(client, "Authentication required", {"code": "AUTH_REQUIRED"})
        self.assertEqual(client.closed, (1008, "Authentication required"))
        self.assertFalse(session.authenticated)

    def test_api_key_not_configured(self) -> None:
        """
        Without configured keys, an apiKey gets "API key authentication not yet implemented",
        the connection stays open and unauthenticated.
        """
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "auth", {"apiKey": "k1"})
        self.assertError(client, "API key authentication not yet implemented")
        self.assertIsNone(client.closed)
        h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.assertError(client, "Not authenticated")

    def test_api_key_configured(self) -> None:
        """A configured API key authenticates as the administrator api-key-user."""
        h = self.harness(auth_required=True, api_keys=("k1",))
        session, client = h.connect()
        h.send(session, "auth", {"apiKey": "k1"})
        self.assertEqual(body(self.one(client, "auth_success")), {"userId": "api-key-user", "permissions": ADMIN})
        h.send(session, "delta", delta("any-doc", {"a": 1}))
        self.one(client, "ack")

    def test_bad_api_key(self) -> None:
        """With keys configured, a wrong key gets auth_error and a 1008 close."""
        h = self.harness(auth_required=True, api_keys=("k1",))
        session, client = h.connect()
        h.send(session, "auth", {"apiKey": "k2"})
        self.assertEqual(body(self.one(client, "auth_error")), {"error": "Authentication failed"})
        self.assertEqual(client.closed, (1008, "Authentication failed"))
        self.assertFalse(session.authenticated)

    def test_token_without_permissions(self) -> None:
        """
        A valid token without a permissions claim authenticates (auth_success has no
        permissions), and its writes and reads get "Permission denied".
        """
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "auth", {"token": h.server.tokens.access_token("u1", None, None)})
        self.assertEqual(body(self.one(client, "auth_success")), {"userId": "u1"})
        h.send(session, "delta", delta("d", {"a": 1}))
        self.assertError(client, "Permission denied", {"documentId": "d"})
        h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        self.assertError(client, "Permission denied", {"documentId": "d"})

    def test_reauth_replaces_identity(self) -> None:
        """A second auth replaces the connection's identity and permissions."""
        h = self.harness(auth_required=True)
        session, client = self.authed(h, ADMIN, user="first")
        h.send(session, "auth", {"token": h.server.tokens.access_token("second", None, {"canRead": ["d"]})})
        self.one(client, "auth_success")
        self.assertEqual(session.identity.user_id, "second")
        h.send(session, "delta", delta("d", {"a": 1}))
        self.assertError(client, "Permission denied", {"documentId": "d"})

    def test_not_authenticated(self) -> None:
        """
        Before auth (auth on), subscribe, sync_request, sync_step1, delta and delta_batch get
        "Not authenticated" and change nothing.
        """
        h = self.harness(auth_required=True)
        session, client = h.connect()
        requests: list[tuple[str, dict[str, Any]]] = [
            ("subscribe", {"documentId": "d"}),
            ("sync_request", {"documentId": "d"}),
            ("sync_step1", {"documentId": "d", "stateVector": {}}),
            ("delta", delta("d", {"a": 1})),
            ("delta_batch", {"documentId": "d", "deltas": [{"type": "set", "field": "a", "value": 1}]}),
        ]
        for kind, payload in requests:
            h.send(session, kind, payload)
            self.assertError(client, "Not authenticated")
        self.assertEqual(session.subscriptions, set())
        self.assertIsNone(client.closed)
        self.assertIsNone(h.server.engine.registry.peek("d"))

    def test_empty_checks_before_auth(self) -> None:
        """Before auth, an empty delta or delta_batch gets its emptiness error, not "Not authenticated"."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "delta", {"documentId": "d", "delta": {}})
        self.assertError(client, "Invalid delta message: missing or empty delta")
        h.send(session, "delta_batch", {"documentId": "d", "deltas": []})
        self.assertError(client, "Invalid delta batch: missing or empty deltas array")

    def test_auth_checked_before_document_id(self) -> None:
        """Before auth, a subscribe with an invalid document id still gets "Not authenticated"."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "subscribe", {"documentId": "bad id"})
        self.assertError(client, "Not authenticated")


class ReadTests(HandlerTestCase):
    def test_sync_request_response(self) -> None:
        """
        sync_request answers sync_response {requestId, documentId, state, deltas: [], clock}
        (clock included), with the document's current fields.
        """
        h = self.harness()
        writer, writer_client = h.connect()
        h.send(writer, "delta", delta("d", {"a": 1, "b": None}))
        writer_client.take()
        session, client = h.connect()
        h.send(session, "sync_request", {"id": "r1", "documentId": "d"})
        response = self.one(client, "sync_response")
        self.assertEqual(
            body(response),
            {"requestId": "r1", "documentId": "d", "state": {"a": 1, "b": None}, "deltas": [], "clock": {writer.id: 2}},
        )
        self.assertNotEqual(response["id"], "r1")

    def test_sync_request_empty_document(self) -> None:
        """An unknown document is served as state {} with an empty clock, and is not persisted."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "sync_request", {"id": "r1", "documentId": "new"})
        response = self.one(client, "sync_response")
        self.assertEqual((response["state"], vector(response["clock"])), ({}, {}))
        self.assertIsNone(self.successResultOf(h.storage.load("new")))

    def test_sync_request_subscribes(self) -> None:
        """After sync_request the connection receives the document's broadcasts."""
        h = self.harness()
        reader, reader_client = h.connect()
        writer, _ = h.connect()
        h.send(reader, "sync_request", {"id": "r", "documentId": "d"})
        reader_client.take()
        self.assertEqual(reader.subscriptions, {"d"})
        h.send(writer, "delta", delta("d", {"title": "Hello"}))
        h.flush()
        self.assertEqual(
            body(self.one(reader_client, "delta")),
            {"documentId": "d", "field": "title", "value": "Hello", "clock": {writer.id: 1}, "clientId": "server"},
        )

    def test_reader_clock_ignored(self) -> None:
        """
        A sync_request's vectorClock never changes the document (a reader could otherwise grow
        every later broadcast without bound): the reply carries the document's own clock.
        """
        h = self.harness()
        writer, _ = h.connect()
        h.send(writer, "delta", delta("d", {"a": 1}))
        session, client = h.connect()
        h.send(session, "sync_request", {"id": "r", "documentId": "d", "vectorClock": {f"x{i}": i for i in range(1000)}})
        self.assertEqual(vector(self.one(client, "sync_response")["clock"]), {writer.id: 1})
        self.assertEqual(vector(h.server.engine.registry.peek("d").clock), {writer.id: 1})

    def test_sync_request_validates_document_id(self) -> None:
        """sync_request checks the document id like subscribe does, before permissions."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "sync_request", {"id": "r", "documentId": "bad id"})
        self.assertError(client, "Document ID contains invalid characters")
        h.send(session, "sync_request", {"id": "r"})
        self.assertError(client, "Invalid document ID")
        self.assertEqual(session.subscriptions, set())

    def test_sync_step1(self) -> None:
        """sync_step1 answers sync_step2 {documentId, operations: []}, whatever the document holds."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta", delta("d", {"a": 1}))
        client.take()
        h.send(session, "sync_step1", {"id": "s", "documentId": "d", "stateVector": {}})
        self.assertEqual(body(self.one(client, "sync_step2")), {"documentId": "d", "operations": []})

    def test_unsubscribe_stops_broadcasts(self) -> None:
        """After unsubscribe the connection no longer receives the document's broadcasts."""
        h = self.harness()
        reader, reader_client = h.connect()
        writer, _ = h.connect()
        h.send(reader, "sync_request", {"id": "r", "documentId": "d"})
        h.send(reader, "unsubscribe", {"documentId": "d"})
        self.assertEqual(len(reader_client.take()), 1)  # the sync_response only
        self.assertEqual(reader.subscriptions, set())
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.flush()
        self.assertEqual(reader_client.take(), [])

    def test_unsubscribe_needs_no_auth(self) -> None:
        """unsubscribe is accepted silently from an unauthenticated connection, even for unknown ids."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "unsubscribe", {"documentId": "d"})
        h.send(session, "unsubscribe", {})
        self.assertEqual(client.take(), [])
        self.assertIsNone(client.closed)


class SubscribeTests(HandlerTestCase):
    def test_subscribe_response(self) -> None:
        """subscribe answers sync_response with requestId, state, deltas [] and the clock, and subscribes."""
        h = self.harness(legacy_field_deltas=False)
        writer, writer_client = h.connect()
        h.send(writer, "delta", delta("d", {"a": 1}))
        writer_client.take()
        session, client = h.connect()
        h.send(session, "subscribe", {"id": "s1", "documentId": "d"})
        self.assertEqual(
            body(self.one(client, "sync_response")),
            {"requestId": "s1", "documentId": "d", "state": {"a": 1}, "deltas": [], "clock": {writer.id: 1}},
        )
        self.assertEqual(session.subscriptions, {"d"})

    def test_invalid_document_ids(self) -> None:
        """subscribe refuses missing, non-string, empty, too long and badly formed document ids."""
        h = self.harness()
        session, client = h.connect()
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "Invalid document ID"),
            ({"documentId": 7}, "Invalid document ID"),
            ({"documentId": ""}, "Invalid document ID"),
            ({"documentId": None}, "Invalid document ID"),
            ({"documentId": "a" * 257}, "Document ID too long"),
            ({"documentId": "a b"}, "Document ID contains invalid characters"),
            ({"documentId": "doc/1"}, "Document ID contains invalid characters"),
            ({"documentId": "doc.1"}, "Document ID contains invalid characters"),
            ({"documentId": "d\u00e9"}, "Document ID contains invalid characters"),
        ]
        for payload, error in cases:
            h.send(session, "subscribe", payload)
            self.assertError(client, error)
        self.assertEqual(session.subscriptions, set())

    def test_trailing_newline_refused(self) -> None:
        """
        An id ending in a newline is refused, as the reference's JavaScript regex refuses it
        (there ``$`` matches only at the very end; Python's ``$`` also matches before a final
        newline), for subscribe and for every other message.
        """
        h = self.harness()
        session, client = h.connect()
        h.send(session, "subscribe", {"documentId": "doc\n"})
        self.assertError(client, "Document ID contains invalid characters")
        h.send(session, "delta", delta("doc\n", {"a": 1}))
        self.assertError(client, "Document ID contains invalid characters")
        self.assertEqual(session.subscriptions, set())

    def test_longest_document_id(self) -> None:
        """A 256-character id of every allowed character class is accepted."""
        h = self.harness()
        session, client = h.connect()
        doc_id = ("aZ09_:-" * 40)[:256]
        h.send(session, "subscribe", {"documentId": doc_id})
        self.assertEqual(self.one(client, "sync_response")["documentId"], doc_id)

    def test_demo_allow_list(self) -> None:
        """With demo_allow_list on, subscribe accepts only the demo's ids and refuses the rest."""
        h = self.harness(demo_allow_list=True)
        session, client = h.connect()
        for doc_id in ("room:x", "playground", "playground:1", "wordwall", "wordwall:z", "1234567890123:x", "12345678901234"):
            h.send(session, "subscribe", {"documentId": doc_id})
            self.assertEqual(self.one(client, "sync_response")["documentId"], doc_id)
        for doc_id in ("doc-1", "room", "playgroundx", "123456789012:x", "x:1234567890123", "wordwalls"):
            h.send(session, "subscribe", {"documentId": doc_id})
            self.assertError(client, "Access denied to this document")
        self.assertNotIn("doc-1", session.subscriptions)

    def test_allow_list_off_by_default(self) -> None:
        """Without demo_allow_list, subscribe accepts any well-formed id."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "subscribe", {"documentId": "doc-1"})
        self.one(client, "sync_response")

    def test_allow_list_only_on_subscribe(self) -> None:
        """The demo allow-list never applies to sync_request or delta."""
        h = self.harness(demo_allow_list=True)
        session, client = h.connect()
        h.send(session, "sync_request", {"id": "r", "documentId": "crud-1-3"})
        self.one(client, "sync_response")
        h.send(session, "delta", delta("crud-1-3", {"a": 1}))
        self.one(client, "ack")

    def test_fields_also_sent_as_deltas(self) -> None:
        """
        After the sync_response, the subscriber alone gets each field as a delta in the broadcast
        shape (SDK 0.1.x shows a late joiner only those); a deleted field is not sent.
        """
        h = self.harness()
        writer, writer_client = h.connect()
        h.send(writer, "delta", delta("d", {"a": 1, "b": {"x": [2]}, "gone": 3}))
        h.send(writer, "delta", delta("d", {"gone": TOMBSTONE}))
        h.flush()
        writer_client.take()
        session, client = h.connect()
        h.send(session, "subscribe", {"id": "s1", "documentId": "d"})
        response, *deltas = client.take()
        self.assertEqual(response["type"], "sync_response")
        clock = {writer.id: 4}
        self.assertEqual(
            [(m["type"], body(m)) for m in deltas],
            [
                ("delta", {"documentId": "d", "field": "a", "value": 1, "clock": clock, "clientId": "server"}),
                ("delta", {"documentId": "d", "field": "b", "value": {"x": [2]}, "clock": clock, "clientId": "server"}),
            ],
        )
        self.assertEqual(writer_client.take(), [])

    def test_fields_as_deltas_can_be_switched_off(self) -> None:
        """With legacy-field-deltas off, subscribe gets only its sync_response."""
        h = self.harness(legacy_field_deltas=False)
        writer, _ = h.connect()
        h.send(writer, "delta", delta("d", {"a": 1}))
        session, client = h.connect()
        h.send(session, "subscribe", {"id": "s1", "documentId": "d"})
        self.one(client, "sync_response")

    def test_subscribe_returns_text_state(self) -> None:
        """
        A document with text state is served with the merged textState and textClock (an
        integer) on subscribe and on sync_request.
        """
        h = self.harness()
        writer, writer_client = h.connect()
        one, two = text_state("alice", "Hello"), text_state("bob", "World")
        for state, ts in ((one, 123), (two, 100.5)):
            op = {"type": "text-state", "state": state, "timestamp": ts}
            h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": [op]})
        writer_client.take()
        expected = FugueText.parse(one)
        expected.merge(FugueText.parse(two))
        for kind in ("subscribe", "sync_request"):
            session, client = h.connect()
            h.send(session, kind, {"id": "s", "documentId": "d"})
            response = self.one(client, "sync_response")
            self.assertEqual(FugueText.parse(response["textState"]).text(), expected.text())
            self.assertEqual(response["textClock"], 123)


class DeltaTests(HandlerTestCase):
    def test_ack_message_id(self) -> None:
        """The ack's messageId is the delta's messageId if given, else its id; the ack's own id is fresh."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta", delta("d", {"a": 1}, id="m1"))
        ack = self.one(client, "ack")
        self.assertEqual(body(ack), {"messageId": "m1"})
        self.assertNotEqual(ack["id"], "m1")
        h.send(session, "delta", delta("d", {"a": 2}, id="m2", messageId="custom"))
        self.assertEqual(body(self.one(client, "ack")), {"messageId": "custom"})

    def test_applied_before_flush(self) -> None:
        """
        A delta's state is visible to another connection's sync_request at once, before any
        broadcast flush; the writer's ack goes out before the broadcast of its own write.
        """
        h = self.harness()
        writer, writer_client = h.connect()
        h.send(writer, "delta", delta("d", {"a": 1}))
        self.one(writer_client, "ack")
        self.assertEqual(self.state(h, "d"), {"a": 1})
        h.flush()
        self.assertEqual(self.one(writer_client, "delta")["value"], 1)

    def test_persisted_before_ack(self) -> None:
        """By the time of the ack, the write is in storage."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta", delta("d", {"a": 1}))
        self.one(client, "ack")
        stored = self.successResultOf(h.storage.load("d"))
        self.assertEqual((stored.fields, stored.clock), ({"a": 1}, {session.id: 1}))

    def test_broadcast_to_all_subscribers(self) -> None:
        """Each written field is broadcast once per subscriber, the writer included, as field/value/clock."""
        h = self.harness()
        writer, writer_client = h.connect()
        reader, reader_client = h.connect()
        h.send(reader, "sync_request", {"id": "r", "documentId": "d"})
        reader_client.take()
        h.send(writer, "delta", delta("d", {"a": 1, "b": "x"}))
        writer_client.take()
        h.flush()
        clock = {writer.id: 2}
        expected = [
            {"documentId": "d", "field": "a", "value": 1, "clock": clock, "clientId": "server"},
            {"documentId": "d", "field": "b", "value": "x", "clock": clock, "clientId": "server"},
        ]
        self.assertEqual([body(m) for m in reader_client.take()], expected)
        self.assertEqual([body(m) for m in writer_client.take()], expected)

    def test_tombstone_deletes(self) -> None:
        """A {"__deleted": true} value removes the field; the broadcast carries the tombstone."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta", delta("d", {"a": 1, "b": 2}))
        h.flush()
        client.take()
        h.send(session, "delta", delta("d", {"a": TOMBSTONE}))
        self.one(client, "ack")
        self.assertEqual(self.state(h, "d"), {"b": 2})
        self.assertEqual(self.successResultOf(h.storage.load("d")).fields, {"b": 2})
        h.flush()
        broadcast = self.one(client, "delta")
        self.assertEqual((broadcast["field"], broadcast["value"]), ("a", TOMBSTONE))

    def test_null_is_a_value(self) -> None:
        """Setting a field to null keeps it, with null, in state and broadcast."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta", delta("d", {"a": 1}))
        h.send(session, "delta", delta("d", {"a": None}))
        self.assertEqual(self.state(h, "d"), {"a": None})
        h.flush()
        broadcasts = client.of_type("delta")
        self.assertEqual(len(broadcasts), 1)
        self.assertIn("value", broadcasts[0])
        self.assertIsNone(broadcasts[0]["value"])

    def test_sdk_single_field_shape(self) -> None:
        """The SDK's {field, value, clock} shape is applied, acked, and its clock merged."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta", {"id": "s", "documentId": "d", "field": "title", "value": "x", "clock": {"sdk": 4}})
        self.assertEqual(body(self.one(client, "ack")), {"messageId": "s"})
        h.send(session, "sync_request", {"id": "r", "documentId": "d"})
        response = self.one(client, "sync_response")
        self.assertEqual(response["state"], {"title": "x"})
        self.assertEqual(vector(response["clock"]), {"sdk": 4, session.id: 1})

    def test_missing_vector_clock(self) -> None:
        """A delta with neither vectorClock nor clock is applied and acked."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta", {"id": "m", "documentId": "d", "delta": {"a": 1}})
        self.one(client, "ack")
        self.assertEqual(self.state(h, "d"), {"a": 1})

    def test_empty_delta(self) -> None:
        """A missing, empty or non-object delta gets "Invalid delta message: missing or empty delta"."""
        h = self.harness()
        session, client = h.connect()
        payloads: list[dict[str, Any]] = [{"documentId": "d"}, {"documentId": "d", "delta": {}}, {"documentId": "d", "delta": "x"}, {"documentId": "d", "delta": [1]}, {"documentId": "d", "delta": None}]
        for payload in payloads:
            h.send(session, "delta", payload)
            self.assertError(client, "Invalid delta message: missing or empty delta")
        self.assertIsNone(h.server.engine.registry.peek("d"))

    def test_delta_auto_subscribes(self) -> None:
        """A writer who may read is subscribed to the document it writes."""
        h = self.harness()
        session, _ = h.connect()
        h.send(session, "delta", delta("d", {"a": 1}))
        self.assertEqual(session.subscriptions, {"d"})

    def test_delta_validates_document_id(self) -> None:
        """A delta to a badly formed document id is refused and nothing is stored."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta", delta("a b", {"a": 1}))
        self.assertError(client, "Document ID contains invalid characters")
        self.assertIsNone(self.successResultOf(h.storage.load("a b")))

    def test_last_modified_from_client_timestamp(self) -> None:
        """The document's lastModified is the writing message's client timestamp."""
        h = self.harness()
        session, _ = h.connect()
        h.send(session, "delta", delta("d", {"a": 1}, timestamp=1234))
        self.assertEqual(h.server.engine.registry.peek("d").last_modified, 1234)


class DeltaBatchTests(HandlerTestCase):
    def test_field_ops(self) -> None:
        """
        Field ops are applied, their clocks merged, each field broadcast after the flush, and the
        batch acked with its messageId.
        """
        h = self.harness()
        writer, writer_client = h.connect()
        reader, reader_client = h.connect()
        h.send(reader, "sync_request", {"id": "r", "documentId": "d"})
        reader_client.take()
        ops = [
            {"type": "set", "documentId": "d", "field": "a", "value": 1, "clock": {"sdk": 3}, "clientId": "c", "timestamp": 5},
            {"type": "set", "documentId": "d", "field": "b", "value": "x", "clock": {"sdk": 4}},
        ]
        h.send(writer, "delta_batch", {"id": "b1", "messageId": "mb", "documentId": "d", "deltas": ops})
        self.assertEqual(body(self.one(writer_client, "ack")), {"messageId": "mb"})
        self.assertEqual(self.state(h, "d"), {"a": 1, "b": "x"})
        self.assertEqual(vector(h.server.engine.registry.peek("d").clock), {"sdk": 4, writer.id: 2})
        self.assertEqual(reader_client.take(), [])
        h.flush()
        self.assertEqual([(m["field"], m["value"]) for m in reader_client.take()], [("a", 1), ("b", "x")])

    def test_delete_op_is_tombstone(self) -> None:
        """An op of type delete removes the field, as a tombstone would."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "delta", delta("d", {"a": 1, "b": 2}))
        h.flush()
        client.take()
        h.send(session, "delta_batch", {"id": "b", "documentId": "d", "deltas": [{"type": "delete", "field": "a"}]})
        self.one(client, "ack")
        self.assertEqual(self.state(h, "d"), {"b": 2})
        h.flush()
        broadcast = self.one(client, "delta")
        self.assertEqual((broadcast["field"], broadcast["value"]), ("a", TOMBSTONE))

    def subscribed(self, h: Harness, doc_id: str = "d") -> tuple[Session, FakeClient]:
        session, client = h.connect()
        h.send(session, "sync_request", {"id": "r", "documentId": doc_id})
        client.take()
        return session, client

    def test_text_state_merged_stored_and_relayed(self) -> None:
        """
        A text-state op is merged into the stored text (never written over it), and relayed at
        once (before any flush) as delta_batch {isTextOperation: true} to the other subscribers,
        carrying the merged state and the writer's clientId; the sender gets only its ack.
        """
        h = self.harness()
        writer, writer_client = self.subscribed(h)
        reader, reader_client = self.subscribed(h)
        first = text_state("alice", "Hello")
        h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": [{"type": "text-state", "state": first}]})
        self.one(writer_client, "ack")
        reader_client.take()
        op = {"type": "text-state", "state": text_state("bob", "World"), "timestamp": 99}
        h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": [op]})
        self.one(writer_client, "ack")
        relay = self.one(reader_client, "delta_batch")
        merged = FugueText.parse(first)
        merged.merge(FugueText.parse(op["state"]))
        self.assertEqual(
            body(relay),
            {"documentId": "d", "deltas": [{**op, "state": merged.to_json(), "clientId": writer.id}], "isTextOperation": True},
        )
        stored = self.successResultOf(h.storage.load("d")).text
        self.assertEqual((stored.state.text(), stored.clock), (merged.text(), HEADER_TS))
        h.flush()
        self.assertEqual(writer_client.take(), [])
        self.assertEqual(reader_client.take(), [])

    def test_unreadable_text_state_refused(self) -> None:
        """
        A text state that cannot be parsed gets an error naming the op, and nothing of the
        message is written: the stored text and the fields before it stay as they were.
        """
        h = self.harness()
        writer, writer_client = self.subscribed(h)
        good = text_state("alice", "Hello")
        h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": [{"type": "text-state", "state": good}]})
        writer_client.take()
        for bad in ('{"fugue":1}', "not json", '{"blocks": [[1, 2]], "clock": {"value": 1}, "client_id": "x"}'):
            ops = [{"type": "set", "field": "a", "value": 1}, {"type": "text-state", "state": bad}]
            h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": ops})
            [error] = writer_client.take()
            self.assertEqual(error["type"], "error")
            self.assertTrue(error["error"].startswith("Invalid text state: "), error)
            self.assertEqual(error["details"], {"documentId": "d", "index": 1, "code": "INVALID_MESSAGE"})
        self.assertEqual(self.successResultOf(h.storage.load("d")).text.state.to_json(), FugueText.parse(good).to_json())
        self.assertEqual(self.state(h, "d"), {})

    def test_op_document_id_honoured(self) -> None:
        """An op naming another document is written there, if the writer may write it."""
        h = self.harness()
        writer, writer_client = self.subscribed(h)
        state = text_state("alice", "Elsewhere")
        ops = [{"type": "text-state", "documentId": "other", "state": state}, {"type": "set", "field": "a", "value": 1}]
        h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": ops})
        self.one(writer_client, "ack")
        self.assertEqual(self.successResultOf(h.storage.load("other")).text.state.text(), "Elsewhere")
        self.assertIsNone(self.successResultOf(h.storage.load("d")).text)
        self.assertEqual(self.state(h, "d"), {"a": 1})

    def test_text_op_client_id_kept(self) -> None:
        """A legacy text op is relayed with its own clientId, counted, and not stored."""
        h = self.harness()
        writer, writer_client = h.connect()
        reader, reader_client = self.subscribed(h)
        op = {"type": "text", "clientId": "browser-1", "ops": [1, 2]}
        h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": [op]})
        self.one(writer_client, "ack")
        self.assertEqual(self.one(reader_client, "delta_batch")["deltas"], [op])
        self.assertIsNone(self.successResultOf(h.storage.load("d")))
        self.assertEqual(h.server.metrics.operations.values["text"], 1)

    def test_text_state_without_state_refused(self) -> None:
        """A text-state op without a state is refused with an error naming it, not silently acked."""
        h = self.harness()
        writer, writer_client = h.connect()
        reader, reader_client = self.subscribed(h)
        h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": [{"type": "text-state", "state": ""}]})
        self.assertError(
            writer_client,
            "Unsupported operation at deltas[0]: a text-state operation without a state",
            {"documentId": "d", "index": 0, "code": "INVALID_MESSAGE"},
        )
        self.assertEqual(reader_client.take(), [])
        self.assertIsNone(h.server.engine.registry.peek("d").text)

    def test_counter_set_richtext_ops_relayed(self) -> None:
        """
        Counter, set and rich-text ops (no field) are relayed at once, as they came, to every
        other subscriber (never back to the sender: applying one twice would count twice),
        acked, counted by kind, and change no field.
        """
        h = self.harness()
        writer, writer_client = self.subscribed(h)
        reader, reader_client = self.subscribed(h)
        ops = [
            {"type": "counter", "operation": "increment", "value": 5, "documentId": "d", "clientId": "c1", "clock": {"c1": 1}},
            {"type": "set", "operation": "add", "value": "apple", "documentId": "d", "clientId": "c1"},
            {"type": "set", "operation": "clear", "documentId": "d", "clientId": "c1"},
            {"type": "richtext", "operation": "format", "start": 0, "end": 2, "attributes": {"bold": True}},
        ]
        h.send(writer, "delta_batch", {"id": "b", "messageId": "m", "documentId": "d", "deltas": ops})
        self.assertEqual(body(self.one(writer_client, "ack")), {"messageId": "m"})
        relay = self.one(reader_client, "delta_batch")
        self.assertEqual(body(relay), {"documentId": "d", "deltas": ops})
        h.flush()
        self.assertEqual((writer_client.take(), reader_client.take()), ([], []))
        self.assertEqual(self.state(h, "d"), {})
        self.assertEqual({k: v for k, v in h.server.metrics.operations.values.items() if v}, {"counter": 1, "set": 2, "richtext": 1})

    def test_unsupported_op_refused(self) -> None:
        """
        An op the server can neither apply nor relay gets an error naming it (never a silent
        ack), and nothing of its message is applied or relayed.
        """
        h = self.harness()
        writer, writer_client = self.subscribed(h)
        reader, reader_client = self.subscribed(h)
        cases = [
            ({"type": "set", "value": "no field, no operation"}, "an operation of type 'set'"),
            ({"type": "counter", "operation": "multiply", "value": 2}, "an operation of type 'counter', operation 'multiply'"),
            ({"type": "mystery"}, "an operation of type 'mystery'"),
            ("not an object", "an operation that is not an object"),
        ]
        for bad, what in cases:
            ops = [{"type": "set", "field": "a", "value": 1}, bad]
            h.send(writer, "delta_batch", {"id": "b", "documentId": "d", "deltas": ops})
            self.assertError(
                writer_client, f"Unsupported operation at deltas[1]: {what}", {"documentId": "d", "index": 1, "code": "INVALID_MESSAGE"}
            )
        h.flush()
        self.assertEqual(reader_client.take(), [])
        self.assertEqual(self.state(h, "d"), {})

    def test_empty_batch(self) -> None:
        """A missing, empty or non-array deltas gets "Invalid delta batch: missing or empty deltas array"."""
        h = self.harness()
        session, client = h.connect()
        payloads: list[dict[str, Any]] = [{"documentId": "d"}, {"documentId": "d", "deltas": []}, {"documentId": "d", "deltas": {"a": 1}}]
        for payload in payloads:
            h.send(session, "delta_batch", payload)
            self.assertError(client, "Invalid delta batch: missing or empty deltas array")


class PermissionTests(HandlerTestCase):
    READER: ClassVar[dict[str, Any]] = {"canRead": ["doc"], "canWrite": [], "isAdmin": False}
    WRITER: ClassVar[dict[str, Any]] = {"canRead": [], "canWrite": ["doc"], "isAdmin": False}

    def test_read_only_user(self) -> None:
        """A read-only user can sync_request, subscribe and sync_step1, but its writes are denied."""
        h = self.harness(auth_required=True)
        session, client = self.authed(h, self.READER)
        h.send(session, "sync_request", {"id": "r", "documentId": "doc"})
        self.one(client, "sync_response")
        h.send(session, "subscribe", {"id": "s", "documentId": "doc"})
        self.one(client, "sync_response")
        h.send(session, "sync_step1", {"id": "s", "documentId": "doc"})
        self.one(client, "sync_step2")
        h.send(session, "delta", delta("doc", {"a": 1}))
        self.assertError(client, "Permission denied", {"documentId": "doc"})
        h.send(session, "delta_batch", {"id": "b", "documentId": "doc", "deltas": [{"type": "set", "field": "a", "value": 1}]})
        self.assertError(client, "Permission denied", {"documentId": "doc"})
        self.assertEqual(h.server.engine.registry.peek("doc").fields, {})

    def test_write_only_user(self) -> None:
        """
        A write-only user's delta is acked, but its reads are denied, and it is not subscribed to
        the document it writes, so it receives no broadcasts of it.
        """
        h = self.harness(auth_required=True)
        session, client = self.authed(h, self.WRITER)
        h.send(session, "delta", delta("doc", {"a": 1}))
        self.one(client, "ack")
        for kind in ("sync_request", "subscribe", "sync_step1"):
            h.send(session, kind, {"id": "r", "documentId": "doc"})
            self.assertError(client, "Permission denied", {"documentId": "doc"})
        self.assertEqual(session.subscriptions, set())
        h.flush()
        self.assertEqual(client.take(), [])

    def test_admin(self) -> None:
        """An admin may read and write any document, with empty lists."""
        h = self.harness(auth_required=True)
        session, client = self.authed(h, ADMIN)
        h.send(session, "delta", delta("anything", {"a": 1}))
        self.one(client, "ack")
        h.send(session, "sync_request", {"id": "r", "documentId": "other"})
        self.one(client, "sync_response")
        h.send(session, "delta_batch", {"id": "b", "documentId": "third", "deltas": [{"type": "set", "field": "a", "value": 1}]})
        self.one(client, "ack")

    def test_exact_match(self) -> None:
        """Document lists match exactly: no prefixes, no case folding, no globs but a whole "*"."""
        h = self.harness(auth_required=True)
        session, client = self.authed(h, {"canRead": ["doc", "pre*"], "canWrite": ["doc"], "isAdmin": False})
        for doc_id in ("doc:1", "do", "Doc", "doc2", "prefix", "pre"):
            h.send(session, "sync_request", {"id": "r", "documentId": doc_id})
            self.assertError(client, "Permission denied", {"documentId": doc_id})
            h.send(session, "delta", delta(doc_id, {"a": 1}))
            self.assertError(client, "Permission denied", {"documentId": doc_id})

    def test_star_grants_everything(self) -> None:
        """A literal "*" in canRead/canWrite grants every document."""
        h = self.harness(auth_required=True)
        session, client = self.authed(h, {"canRead": ["*"], "canWrite": ["*"]})
        h.send(session, "delta", delta("x-1", {"a": 1}))
        self.one(client, "ack")
        h.send(session, "sync_request", {"id": "r", "documentId": "y-2"})
        self.one(client, "sync_response")

    def test_broadcasts_only_to_authenticated(self) -> None:
        """Broadcasts reach the authenticated subscribers of a document only."""
        h = self.harness(auth_required=True)
        writer, writer_client = self.authed(h, ADMIN, user="w")
        reader, reader_client = self.authed(h, self.READER, user="r")
        h.send(reader, "sync_request", {"id": "r", "documentId": "doc"})
        reader_client.take()
        h.send(writer, "delta", delta("doc", {"a": 1}))
        h.flush()
        self.assertEqual([m["field"] for m in reader_client.of_type("delta")], ["a"])
        self.assertEqual([m["field"] for m in writer_client.of_type("delta")], ["a"])


class ConnectionLimitTests(HandlerTestCase):
    def test_per_ip_limit(self) -> None:
        """
        Past max_connections_per_ip the connection is closed 1008 "Too many connections from your
        IP"; other addresses are unaffected; closing one frees a slot.
        """
        h = self.harness(max_connections_per_ip=2)
        first, first_client = h.connect("10.0.0.1")
        _, second_client = h.connect("10.0.0.1")
        _, third_client = h.connect("10.0.0.1")
        self.assertIsNone(first_client.closed)
        self.assertIsNone(second_client.closed)
        self.assertEqual(third_client.closed, (1008, "Too many connections from your IP"))
        _, other_client = h.connect("10.0.0.2")
        self.assertIsNone(other_client.closed)
        first.closed()
        _, again_client = h.connect("10.0.0.1")
        self.assertIsNone(again_client.closed)
        _, over_client = h.connect("10.0.0.1")
        self.assertEqual(over_client.closed, (1008, "Too many connections from your IP"))

    def test_refused_connection_handles_nothing(self) -> None:
        """A refused connection is not counted, sends nothing, and answers no message."""
        h = self.harness(max_connections_per_ip=1)
        h.connect("10.0.0.1")
        refused, client = h.connect("10.0.0.1")
        h.send(refused, "ping", {})
        h.send(refused, "sync_request", {"id": "r", "documentId": "d"})
        self.assertEqual(client.take(), [])
        self.assertEqual(h.server.stats()["connections"]["totalConnections"], 1)

    def test_refused_close_frees_nothing(self) -> None:
        """
        The close of a refused connection, and a second close of an admitted one, do not free a
        slot they do not hold.
        """
        h = self.harness(max_connections_per_ip=2)
        first, _ = h.connect("10.0.0.1")
        h.connect("10.0.0.1")
        refused, _ = h.connect("10.0.0.1")
        refused.closed()
        _, client = h.connect("10.0.0.1")
        self.assertEqual(client.closed, (1008, "Too many connections from your IP"))
        first.closed()
        first.closed()
        _, client = h.connect("10.0.0.1")
        self.assertIsNone(client.closed)
        _, client = h.connect("10.0.0.1")
        self.assertEqual(client.closed, (1008, "Too many connections from your IP"))

    def test_server_capacity(self) -> None:
        """Past max_connections any new connection is closed 1008 "Server at maximum capacity"."""
        h = self.harness(max_connections=1)
        first, _ = h.connect("10.0.0.1")
        _, client = h.connect("10.0.0.2")
        self.assertEqual(client.closed, (1008, "Server at maximum capacity"))
        first.closed()
        _, client = h.connect("10.0.0.2")
        self.assertIsNone(client.closed)

    def test_per_ip_checked_first(self) -> None:
        """When both limits are reached, the per-address reason is given."""
        h = self.harness(max_connections=1, max_connections_per_ip=1)
        h.connect("10.0.0.1")
        _, client = h.connect("10.0.0.1")
        self.assertEqual(client.closed, (1008, "Too many connections from your IP"))


class StatsTests(HandlerTestCase):
    def test_connections_and_users(self) -> None:
        """
        stats() counts open connections, authenticated or not, and distinct user ids; closed
        connections leave both counts.
        """
        h = self.harness(auth_required=True)
        self.assertEqual(h.server.stats()["connections"], {"totalConnections": 0, "totalUsers": 0, "totalClients": 0})
        a1, _ = self.authed(h, EVERYONE, user="alice")
        self.authed(h, EVERYONE, user="alice")
        bob, _ = self.authed(h, EVERYONE, user="bob")
        h.connect()
        self.assertEqual(h.server.stats()["connections"], {"totalConnections": 4, "totalUsers": 2, "totalClients": 0})
        bob.closed()
        a1.closed()
        self.assertEqual(h.server.stats()["connections"], {"totalConnections": 2, "totalUsers": 1, "totalClients": 0})

    def test_anonymous_users_by_address(self) -> None:
        """With auth off, each address is one anonymous user."""
        h = self.harness()
        h.connect("10.0.0.1")
        h.connect("10.0.0.1")
        h.connect("10.0.0.2")
        self.assertEqual(h.server.stats()["connections"], {"totalConnections": 3, "totalUsers": 2, "totalClients": 0})

    def test_documents(self) -> None:
        """stats() lists cached documents with their subscriber count and lastModified."""
        h = self.harness()
        writer, _ = h.connect()
        reader, _ = h.connect()
        h.send(writer, "delta", delta("d", {"a": 1}))
        h.send(reader, "sync_request", {"id": "r", "documentId": "d"})
        h.send(reader, "sync_request", {"id": "r", "documentId": "e"})
        documents = h.server.stats()["documents"]
        self.assertEqual(documents["totalDocuments"], 2)
        self.assertEqual(
            sorted(documents["documents"], key=lambda d: d["id"]),
            [
                {"id": "d", "subscribers": 2, "lastModified": HEADER_TS},
                {"id": "e", "subscribers": 1, "lastModified": None},
            ],
        )
        reader.closed()
        self.assertEqual(
            {d["id"]: d["subscribers"] for d in h.server.stats()["documents"]["documents"]}, {"d": 1, "e": 0}
        )
