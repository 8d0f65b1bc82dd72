"""
A real WebSocket client for integration tests: Autobahn on the running reactor, speaking the
binary protocol, with Deferreds to wait for the messages a test expects; and a test case that
runs the real service on a real port for it to talk to.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from synckit import wire
from synckit.pubsub.interface import IPubSub
from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.service import SyncKitService
from synckit.storage.interface import IStorage
from synckit.storage.memory import MemoryStorage
from tests.helpers import binary, config


class RecordingClient(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []
        self.opened: Deferred = Deferred()
        self.closed: Deferred = Deferred()
        self._waiting: list[tuple[Callable[[dict[str, Any]], bool], Deferred]] = []

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        message = wire.decode(payload, lambda: "")
        for entry in self._waiting:
            if entry[0](message):
                self._waiting.remove(entry)
                entry[1].callback(message)
                return
        self.received.append(message)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(reason))
        self.closed.callback((code, reason))

    def send(self, kind: str, payload: Optional[dict[str, Any]] = None) -> None:
        self.sendMessage(binary(kind, payload), isBinary=True)

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout: float = 5) -> Deferred:
        """Fires with the first message, already received or yet to come, that C{match}es."""
        for message in self.received:
            if match(message):
                self.received.remove(message)
                d: Deferred = Deferred()
                d.callback(message)
                return d
        d = Deferred()
        self._waiting.append((match, d))
        return d.addTimeout(timeout, reactor)

    def wait_type(self, kind: str) -> Deferred:
        return self.wait_for(lambda m: m["type"] == kind)


async def connect(port: int, path: str = "/ws") -> RecordingClient:
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}")
    factory.protocol = RecordingClient
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    await client.opened
    return client


class ServiceCase(TestCase):
    """Starts the real service on port 0 (memory storage and a bus of one unless given others)."""

    def start(self, storage: Optional[IStorage] = None, pubsub: Optional[IPubSub] = None, **overrides: Any) -> SyncKitService:
        service = SyncKitService(
            config(port=0, host="127.0.0.1", **overrides),
            reactor,
            storage or MemoryStorage(),
            pubsub or LocalPubSub(LocalBus(reactor)),
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    async def started(self, **kwargs: Any) -> tuple[SyncKitService, int]:
        service = self.start(**kwargs)
        await service.started
        return service, service.ports[0].getHost().port

    async def client(self, port: int) -> RecordingClient:
        client = await connect(port)
        self.addCleanup(lambda: client.state != client.STATE_CLOSED and client.dropConnection(abort=True))
        return client

    async def get(self, port: int, path: str) -> tuple[int, dict]:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
        return response.code, json.loads(await readBody(response))
