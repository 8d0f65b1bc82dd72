"""
What each client message type does (PROTOCOL.md section 4).

A handler takes the session and the decoded message.  It is a plain function when it never
waits, and a coroutine function when it may wait on storage; either way it raises
L{synckit.session.Reject} for the protocol's expected errors.  L{HANDLERS} is also the allow-list
of client-sendable types (section 3.2): anything not in it is refused before a handler runs.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Coroutine, NamedTuple, Optional

from synckit.auth import EVERYONE, EVERYONE_CLAIM, Identity, InvalidToken
from synckit.session import Reject, Session
from synckit.storage.interface import FieldWrite
from synckit.sync.document import TOMBSTONE, Document, Prior
from synckit.wire import Frame, Message

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
    """The reference demo's allow-list for ``subscribe`` (section 4.2 step 3), when switched on."""
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


def on_auth(session: Session, message: Message) -> None:
    server = session.server
    token, api_key = message.get("token"), message.get("apiKey")
    if token:
        try:
            identity = server.tokens.identity(token)
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


def _sync_response(request: Message, doc: Document) -> dict[str, Any]:
    # The clock is sent with sync_request answers too: the SDK needs a non-empty clock
    # whenever the state is non-empty.
    return {"requestId": request["id"], "documentId": doc.id, "state": doc.fields, "deltas": [], "clock": doc.clock}


async def on_subscribe(session: Session, message: Message) -> None:
    identity = session.require_auth()
    doc_id = document_id(message)
    if session.server.config.demo_allow_list and not demo_allowed(doc_id):
        raise Reject("Access denied to this document")
    _permitted(identity.permissions.readable(doc_id), doc_id)
    doc = await session.server.registry.open(doc_id)
    session.subscribe(doc_id)
    body = _sync_response(message, doc)
    if doc.text is not None:
        body["textState"], body["textClock"] = doc.text
    session.reply("sync_response", body)


async def on_sync_request(session: Session, message: Message) -> None:
    doc_id = readable_document(session, message)
    doc = await session.server.registry.open(doc_id)
    session.subscribe(doc_id)
    if message.get("vectorClock"):
        doc.merge_clock(message["vectorClock"])
    session.reply("sync_response", _sync_response(message, doc))


def on_unsubscribe(session: Session, message: Message) -> None:
    doc_id = message.get("documentId")
    if isinstance(doc_id, str):
        session.unsubscribe(doc_id)


def on_sync_step1(session: Session, message: Message) -> None:
    doc_id = readable_document(session, message)
    session.reply("sync_step2", {"documentId": doc_id, "operations": []})


# Writing


async def _open_for_writing(session: Session, doc_id: str) -> Document:
    doc = await session.server.registry.open(doc_id)
    # Writers are subscribed, as in the reference, unless they may not read the document.
    if session.require_auth().permissions.readable(doc_id):
        session.subscribe(doc_id)
    return doc


def _acknowledge(session: Session, message: Message) -> None:
    session.reply("ack", {"messageId": message.get("messageId") or message.get("id")})


async def on_delta(session: Session, message: Message) -> None:
    changes = message.get("delta")
    if not changes and message.get("field") is not None:
        changes = {str(message["field"]): message.get("value")}  # the SDK's single-field shape
    if not isinstance(changes, dict) or not changes:
        raise Reject("Invalid delta message: missing or empty delta")
    doc_id = writable_document(session, message)
    doc = await _open_for_writing(session, doc_id)
    server = session.server
    now = server.now_ms()
    priors: list[Prior] = []
    writes = [_write(doc, session, name, value, now, priors) for name, value in changes.items()]
    doc.merge_clock(message.get("vectorClock") or message.get("clock"))
    doc.last_modified = message.get("timestamp")
    await server.commit(doc, writes, priors, session.received_at)
    _acknowledge(session, message)


def _write(doc: Document, session: Session, field: str, value: Any, now: int, priors: list[Prior]) -> FieldWrite:
    """Apply one field write to the cached document, noting in C{priors} how to take it back."""
    priors.append(doc.prior(field))
    authoritative, stamp = doc.write(field, value, session.id, now)
    return FieldWrite(field, authoritative, session.id, stamp[1], stamp[0])


async def on_delta_batch(session: Session, message: Message) -> None:
    ops = message.get("deltas")
    if not isinstance(ops, list) or not ops:
        raise Reject("Invalid delta batch: missing or empty deltas array")
    doc_id = writable_document(session, message)
    doc = await _open_for_writing(session, doc_id)
    server = session.server
    now = server.now_ms()
    writes: list[FieldWrite] = []
    priors: list[Prior] = []
    text_ops: list[dict[str, Any]] = []
    for op in ops:
        if not isinstance(op, dict):
            continue
        kind = op.get("type")
        if kind in ("text-state", "text"):
            if kind == "text-state":
                if not op.get("state"):
                    continue
                # No Fugue merge here: the incoming state replaces the stored one, as the
                # reference does when its WASM core is absent (section 6.10).
                doc.text = (op["state"], op.get("timestamp") or now)
                await server.storage.save_text(doc_id, *doc.text)
            text_ops.append({**op, "clientId": op.get("clientId") or session.id})
        elif op.get("field") is not None:
            value = TOMBSTONE if kind == "delete" else op.get("value")
            writes.append(_write(doc, session, str(op["field"]), value, now, priors))
            if op.get("clock"):
                doc.merge_clock(op["clock"])
    doc.last_modified = message.get("timestamp")
    if writes:
        await server.commit(doc, writes, priors, session.received_at)
    if text_ops:
        # Text operations go out at once, to everyone but the sender (section 4.8 step 6).
        frame = Frame(
            "delta_batch",
            now,
            {"id": server.ids(now), "documentId": doc_id, "deltas": text_ops, "isTextOperation": True},
        )
        server.deliver(frame, server.registry.subscribers(doc_id), exclude=session)
    _acknowledge(session, message)


# Presence


def on_awareness_subscribe(session: Session, message: Message) -> None:
    # Unlike the reference, presence is only for those who may read the document.
    doc_id = readable_document(session, message)
    states = session.server.subscribe_awareness(session, doc_id)
    session.reply("awareness_state", {"documentId": doc_id, "states": states})


def on_awareness_update(session: Session, message: Message) -> None:
    doc_id = readable_document(session, message)
    client_id = message.get("clientId")
    if not isinstance(client_id, str) or not client_id:
        raise Reject("Failed to update awareness")
    session.server.update_awareness(doc_id, client_id, message.get("state"), message.get("clock"))


def ignore(session: Session, message: Message) -> None:
    """Allowed and deliberately unanswered: client acks, pongs, connect, snapshot requests."""


class Handler(NamedTuple):
    function: Callable[[Session, Message], Optional[Coroutine[Any, Any, None]]]
    #: the error sent when the handler fails unexpectedly, and whether it names the document.
    failure: tuple[str, bool]


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
