"""
What each client message type does.

A handler takes the session and the decoded message.  It is a plain function when it never
waits, and a coroutine function when it may wait on storage; either way it raises
L{synckit.session.Reject} for the protocol's expected errors.  Handlers validate and authorize;
what a write does to documents is the engine's (L{synckit.sync.engine}), one call per message.
L{HANDLERS} is also the allow-list of client-sendable types: anything not in it is refused
before a handler runs.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import orjson

from synckit.auth import EVERYONE, EVERYONE_CLAIM, Identity, InvalidToken
from synckit.session import Handler, Reject, Session
from synckit.sync.broadcast import field_delta
from synckit.sync.awareness import PresenceLimit
from synckit.sync.document import TOMBSTONE, Document
from synckit.sync.engine import Changes, SyncEngine
from synckit.sync.fugue import FugueText, TextStateError
from synckit.wire import Message

_DOCUMENT_ID = re.compile(r"[a-zA-Z0-9_:-]+")
_PAGE_ID = re.compile(r"^\d{13,}")


def document_id(message: Message) -> str:
    """The message's ``documentId``, checked as the reference checks it for ``subscribe``."""
    doc_id = message.get("documentId")
    if not isinstance(doc_id, str) or not doc_id:
        raise Reject("Invalid document ID")
    if len(doc_id) > 256:
        raise Reject("Document ID too long")
    if not _DOCUMENT_ID.fullmatch(doc_id):  # fullmatch: $ would let a trailing newline in
        raise Reject("Document ID contains invalid characters")
    return doc_id


def demo_allowed(doc_id: str) -> bool:
    """The reference demo's allow-list for ``subscribe``, when switched on."""
    return (
        doc_id == "playground"
        or doc_id.startswith("playground:")
        or doc_id == "wordwall"
        or doc_id.startswith("wordwall:")
        or doc_id.startswith("room:")
        or bool(_PAGE_ID.match(doc_id.split(":", 1)[0]))
    )


def _permitted(allowed: bool, doc_id: str) -> str:
    if not allowed:
        raise Reject("Permission denied", {"documentId": doc_id})
    return doc_id


def readable_document(session: Session, message: Message) -> str:
    """The message's document, once the session is known to be authenticated and allowed to read it."""
    identity = session.require_auth()
    doc_id = document_id(message)
    return _permitted(identity.permissions.readable(doc_id), doc_id)


def writable_document(session: Session, message: Message) -> str:
    identity = session.require_auth()
    doc_id = document_id(message)
    return _permitted(identity.permissions.writable(doc_id), doc_id)


# Authentication


async def on_auth(session: Session, message: Message) -> None:
    server = session.server
    token, api_key = message.get("token"), message.get("apiKey")
    if token:
        try:
            identity = await server.tokens.authenticate(token)
        except InvalidToken:
            _auth_failed(session)
            return
    elif api_key:
        if not server.config.api_keys:
            raise Reject("API key authentication not yet implemented")
        identity = server.api_key_identity(api_key)
        if identity is None:
            _auth_failed(session)
            return
    elif not server.config.auth_required:
        identity = Identity("anonymous", EVERYONE, EVERYONE_CLAIM)
    else:
        session.error("Authentication required", {"code": "AUTH_REQUIRED"})
        session.close(1008, "Authentication required")
        return
    session.authenticate(identity)
    body: dict[str, Any] = {"userId": identity.user_id}
    if identity.permissions_claim is not None:
        body["permissions"] = identity.permissions_claim
    session.reply("auth_success", body)


def _auth_failed(session: Session) -> None:
    session.reply("auth_error", {"error": "Authentication failed"})
    session.close(1008, "Authentication failed")


# Reading


def _sync_response(session: Session, request: Message, doc: Document) -> dict[str, Any]:
    # The clock is sent with every answer: the SDK needs a non-empty clock whenever the state is
    # non-empty, and applies the state's values stamped by it.  The text goes with it too, so
    # that a client that syncs rather than subscribes gets it.
    clock = doc.served_clock(session.server.now_ms())
    body = {"requestId": request["id"], "documentId": doc.id, "state": doc.fields, "deltas": [], "clock": clock}
    if doc.text is not None:
        body["textState"], body["textClock"] = doc.text.state.to_json(), doc.text.clock
    return body


async def on_subscribe(session: Session, message: Message) -> None:
    identity = session.require_auth()
    doc_id = document_id(message)
    if session.server.config.demo_allow_list and not demo_allowed(doc_id):
        raise Reject("Access denied to this document")
    _permitted(identity.permissions.readable(doc_id), doc_id)
    doc = await session.server.engine.open(doc_id)
    session.subscribe(doc_id)
    session.reply("sync_response", _sync_response(session, message, doc))
    if session.server.config.legacy_field_deltas:
        _send_fields(session, doc)


def _send_fields(session: Session, doc: Document) -> None:
    """
    Each field again as a ``delta`` message, as broadcasts carry them: SDK 0.1.x ignores the
    ``state`` of ``sync_response`` and shows a late joiner only what comes as deltas.
    """
    server = session.server
    now = server.now_ms()
    for name in list(doc.fields):
        session.send(field_delta(doc, name, server.ids, now))
    server.metrics.sent.inc("delta", len(doc.fields))


async def on_sync_request(session: Session, message: Message) -> None:
    # The client's vectorClock is not merged into the document: a reader must not change it,
    # and a writer's clock arrives with its writes.
    doc_id = readable_document(session, message)
    doc = await session.server.engine.open(doc_id)
    session.subscribe(doc_id)
    session.reply("sync_response", _sync_response(session, message, doc))


def on_unsubscribe(session: Session, message: Message) -> None:
    doc_id = message.get("documentId")
    if isinstance(doc_id, str):
        session.unsubscribe(doc_id)


def on_sync_step1(session: Session, message: Message) -> None:
    doc_id = readable_document(session, message)
    session.reply("sync_step2", {"documentId": doc_id, "operations": []})


# Writing


def _subscribe_writer(session: Session, doc_id: str) -> None:
    # Writers are subscribed, as in the reference, unless they may not read the document.
    if session.require_auth().permissions.readable(doc_id):
        session.subscribe(doc_id)


def _acknowledge(session: Session, message: Message) -> None:
    session.reply("ack", {"messageId": message.get("messageId") or message.get("id")})


def _timestamp(value: Any) -> Optional[int]:
    """A client-supplied time (ms) if it is a finite number, else C{None}: it is shown to others."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return int(value)
    return None


def _bounded(session: Session, count: int) -> None:
    """
    Refuse a message with more field writes or operations than C{max-ops-per-message}, before
    anything is saved: one message is one transaction holding a pooled PostgreSQL connection,
    and its work grows with its ops (the SDK sends at most 50).
    """
    limit = session.server.config.max_ops_per_message
    if count > limit:
        raise Reject(
            f"Too many operations in one message: {count}, at most {limit}",
            {"code": "TOO_MANY_OPERATIONS", "limit": limit},
        )


async def on_delta(session: Session, message: Message) -> None:
    changes = message.get("delta")
    if not changes and message.get("field") is not None:
        changes = {str(message["field"]): message.get("value")}  # the SDK's single-field shape
    if not isinstance(changes, dict) or not changes:
        raise Reject("Invalid delta message: missing or empty delta")
    _bounded(session, len(changes))
    doc_id = writable_document(session, message)
    change = Changes(fields=list(changes.items()), last_modified=_timestamp(message.get("timestamp")))
    change.clocks.append(message.get("vectorClock") or message.get("clock"))
    _subscribe_writer(session, doc_id)
    await session.server.engine.write(session, {doc_id: change}, session.received_at)
    _acknowledge(session, message)


#: ops relayed without being applied here: type -> the operations each may carry
_RELAYED = {
    "counter": frozenset({"increment", "decrement"}),
    "set": frozenset({"add", "remove", "clear"}),
    "richtext": frozenset({"format", "unformat"}),
}


async def on_delta_batch(session: Session, message: Message) -> None:
    ops = message.get("deltas")
    if not isinstance(ops, list) or not ops:
        raise Reject("Invalid delta batch: missing or empty deltas array")
    _bounded(session, len(ops))
    doc_id = writable_document(session, message)
    now = session.server.now_ms()
    changes: dict[str, Changes] = {doc_id: Changes(last_modified=_timestamp(message.get("timestamp")))}
    for index, op in enumerate(ops):
        if not isinstance(op, dict):
            raise _unsupported(doc_id, index, "an operation that is not an object")
        target = doc_id
        if op.get("documentId") not in (None, doc_id):
            # An op names its own document: it is written there, if the writer may.
            target = writable_document(session, op)
        change = changes.get(target) or changes.setdefault(target, Changes())
        _add_op(change, op, index, target, now, session.server.engine)
    for target in changes:
        _subscribe_writer(session, target)
    await session.server.engine.write(session, changes, session.received_at)
    _acknowledge(session, message)


def _add_op(change: Changes, op: dict[str, Any], index: int, doc_id: str, now: int, engine: SyncEngine) -> None:
    """Validate one op of a ``delta_batch`` and add it to what the message writes to C{doc_id}."""
    kind = op.get("type")
    if kind == "text-state":
        state = op.get("state")
        if not isinstance(state, str) or not state:
            raise _unsupported(doc_id, index, "a text-state operation without a state")
        try:
            parsed = FugueText.parse(state, like=engine.cached_text(doc_id))
        except TextStateError as e:
            raise Reject(
                f"Invalid text state: {e}", {"documentId": doc_id, "index": index, "code": "INVALID_MESSAGE"}
            ) from None
        change.add_text(parsed, _timestamp(op.get("timestamp")) or now)
        change.text_ops.append(op)
    elif kind == "text":
        change.text_ops.append(op)  # the SDK's deprecated position-based op: relayed, not stored
    elif op.get("field") is not None:
        change.fields.append((str(op["field"]), TOMBSTONE if kind == "delete" else op.get("value")))
    elif isinstance(kind, str) and op.get("operation") in _RELAYED.get(kind, ()):
        change.ops.append((kind, op["operation"], op))
    else:
        what = f"type {kind!r}" + (f", operation {op.get('operation')!r}" if "operation" in op else "")
        raise _unsupported(doc_id, index, f"an operation of {what}")
    if op.get("clock"):
        change.clocks.append(op["clock"])


def _unsupported(doc_id: str, index: int, what: str) -> Reject:
    return Reject(
        f"Unsupported operation at deltas[{index}]: {what}",
        {"documentId": doc_id, "index": index, "code": "INVALID_MESSAGE"},
    )


# Presence


def on_awareness_subscribe(session: Session, message: Message) -> None:
    # Unlike the reference, presence is only for those who may read the document.
    doc_id = readable_document(session, message)
    states = session.server.engine.subscribe_awareness(session, doc_id)
    session.reply("awareness_state", {"documentId": doc_id, "states": states})


def on_awareness_update(session: Session, message: Message) -> None:
    doc_id = readable_document(session, message)
    client_id = message.get("clientId")
    if not isinstance(client_id, str) or not client_id:
        raise Reject("Failed to update awareness")
    config = session.server.config
    state, clock = message.get("state"), message.get("clock")
    # Presence is kept in memory and sent to every watcher, and again in each awareness_state.
    size = len(orjson.dumps(state)) + len(orjson.dumps(clock))
    if size > config.max_presence_size:
        raise Reject(
            f"Presence state too large ({size} bytes, max {config.max_presence_size})",
            {"documentId": doc_id, "code": "INVALID_MESSAGE"},
        )
    limits = (config.max_presence_per_document, config.max_presence_per_connection)
    try:
        user = session.require_auth().user_id
        session.server.engine.update_awareness(session, user, doc_id, client_id, state, clock, *limits)
    except PresenceLimit as e:
        raise Reject(str(e), {"documentId": doc_id, "code": "INVALID_MESSAGE"}) from None


def ignore(session: Session, message: Message) -> None:
    """Allowed and deliberately unanswered: client acks, pongs, connect, snapshot requests."""


_INTERNAL = ("Internal server error", False)

HANDLERS: dict[str, Handler] = {
    "connect": Handler(ignore, _INTERNAL),
    "auth": Handler(on_auth, _INTERNAL),
    "subscribe": Handler(on_subscribe, ("Subscribe failed", True)),
    "unsubscribe": Handler(on_unsubscribe, ("Unsubscribe failed", True)),
    "sync_request": Handler(on_sync_request, ("Sync request failed", True)),
    "sync_step1": Handler(on_sync_step1, ("SyncStep1 failed", True)),
    "delta": Handler(on_delta, ("Delta application failed", True)),
    "delta_batch": Handler(on_delta_batch, ("Delta batch application failed", True)),
    "ack": Handler(ignore, _INTERNAL),
    "awareness_subscribe": Handler(on_awareness_subscribe, ("Failed to subscribe to awareness", False)),
    "awareness_update": Handler(on_awareness_update, ("Failed to update awareness", False)),
    "snapshot_request": Handler(ignore, _INTERNAL),
    "snapshot_upload": Handler(ignore, _INTERNAL),
    "ping": Handler(ignore, _INTERNAL),
    "pong": Handler(ignore, _INTERNAL),
}
