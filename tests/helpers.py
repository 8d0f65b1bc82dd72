"""
Fakes and builders shared by the tests: a recording client in place of a WebSocket, a server
on a L{Clock}, and frame builders that speak the wire format the way SyncKit clients do.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from synckit import wire
from synckit.config import Config
from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.server import SyncServer
from synckit.session import Session
from synckit.storage.memory import MemoryStorage
from synckit.sync.document import SERVER_CLOCK

#: the JWT secret the tests sign with
SECRET = "test-secret-key-for-unit-tests-only-32-chars"


def config(**overrides: Any) -> Config:
    """A config for tests: auth off unless asked for, generous limits, our secret."""
    values: dict[str, Any] = {"auth_required": False, "jwt_secret": SECRET, "max_messages_per_minute": 100_000}
    values.update(overrides)
    return dataclasses.replace(Config(), **values)


def binary(kind: str, payload: Optional[dict[str, Any]] = None, timestamp: int = 1_700_000_000_000) -> bytes:
    """A binary frame as the SDK and the test client build it."""
    body = json.dumps(payload or {}).encode("utf-8")
    return struct.pack(">BqI", wire.TYPE_CODES[kind], timestamp, len(body)) + body


def text(kind: str, **fields: Any) -> bytes:
    """A JSON text message with the required top-level type, id and timestamp."""
    message = {"type": kind, "id": fields.pop("id", "json-1"), "timestamp": fields.pop("timestamp", 1)}
    message.update(fields)
    return json.dumps(message).encode("utf-8")


def vector(clock: dict[str, int]) -> dict[str, int]:
    """A clock without the server's ordering entry (tested on its own in test_document)."""
    return {k: v for k, v in clock.items() if k != SERVER_CLOCK}


def text_state(client: str, text: str, clock: int = 0) -> str:
    """
    The text state a SyncText client sends after typing C{text} into an empty document, as
    SyncKit's core writes it (one block; C{clock}: the client's clock before typing).
    """
    key = {"client_id": client, "clock": clock + len(text), "offset": 0}
    block = {"id": key, "text": text, "left_origin": None, "right_origin": None, "deleted": False}
    return json.dumps({"blocks": [[key, block]], "clock": {"value": clock + len(text)}, "client_id": client})


class FakeClient:
    """Stands in for the WebSocket: records what the session sends, decoded as a client would."""

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bool]] = []
        self.closed: Optional[tuple[int, str]] = None

    def send_frame(self, frame: wire.Frame, binary: bool) -> None:
        self.frames.append((frame.encoded(binary), binary))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Everything received so far, decoded (binary frames as the test client decodes them)."""
        out = []
        for data, is_binary in self.frames:
            out.append(wire.decode(data, lambda: "") if is_binary else json.loads(data))
        return out

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    def take(self) -> list[dict[str, Any]]:
        """The messages received since the last take."""
        messages = self.messages
        self.frames.clear()
        return messages


class Harness:
    """A L{SyncServer} on a L{Clock} with in-memory storage, and helpers to connect clients."""

    def __init__(self, clock: Optional[Clock] = None, bus: Optional[LocalBus] = None, **overrides: Any) -> None:
        self.clock = clock or Clock()
        self.clock.advance(1_700_000_000)
        self.storage = MemoryStorage()
        self.pubsub = LocalPubSub(bus or LocalBus(self.clock))
        self.server = SyncServer(config(**overrides), self.clock, self.storage, self.pubsub)
        self.pubsub.start(self.server.engine.receive_remote, self.server.engine.resync)

    def connect(self, ip: str = "127.0.0.1") -> tuple[Session, FakeClient]:
        client = FakeClient()
        return self.server.open_session(client, ip), client

    def send(self, session: Session, kind: str, payload: Optional[dict[str, Any]] = None) -> None:
        session.receive(binary(kind, payload), True)

    def present(self, doc_id: str = "d") -> list[dict[str, Any]]:
        """The presence states a new awareness subscriber is told about (it disconnects again)."""
        session, client = self.connect("192.0.2.99")
        self.send(session, "awareness_subscribe", {"documentId": doc_id})
        [reply] = client.take()
        session.closed()
        return reply["states"]

    def flush(self) -> None:
        """Run the end-of-turn broadcast flush (and anything else due now)."""
        self.clock.advance(0)


class HarnessCase(SynchronousTestCase):
    """Tests on a L{Harness}: each test must leave nothing scheduled once it has flushed."""

    def harness(self, **overrides: Any) -> Harness:
        h = Harness(**overrides)

        def no_timers_left() -> None:
            h.flush()
            self.assertEqual(h.clock.getDelayedCalls(), [])

        self.addCleanup(no_timers_left)
        return h
