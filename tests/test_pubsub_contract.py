"""
The pub/sub contract (L{synckit.pubsub.interface.IPubSub}), run against every implementation:
the in-process bus, and Redis on a real server (tests/services.py).  Then what only Redis can do:
lose its server, and carry garbage.
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import Any

import cbor2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from synckit.pubsub.interface import IPubSub, PubSubUnavailable
from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.pubsub.redis import RedisPubSub
from tests.services import RedisServer, free_port, shared_redis
from tests.test_postgres import eventually

_prefixes = itertools.count(1)


class Endpoint:
    """A started pub/sub with a receiver that records what it is handed, and its resyncs."""

    def __init__(self, pubsub: IPubSub) -> None:
        self.pubsub = pubsub
        self.received: list[tuple[str, str, dict[str, Any]]] = []
        self.resyncs = 0

    def start(self) -> Deferred:
        return self.pubsub.start(lambda *publication: self.received.append(publication), self.resync)

    def resync(self) -> None:
        self.resyncs += 1

    async def receives(self, expected: list[tuple[str, str, dict[str, Any]]]) -> None:
        async def check() -> None:
            if self.received != expected:
                raise AssertionError(f"{self.received!r} != {expected!r}")

        await eventually(check, within=5)


class PubSubContract:
    """Mixed into a TestCase whose C{make} returns an unstarted pub/sub on this test's medium."""

    def make(self) -> IPubSub:
        raise NotImplementedError

    async def endpoints(self, n: int = 2) -> list[Endpoint]:
        result = []
        for _ in range(n):
            endpoint = Endpoint(self.make())
            await endpoint.start()
            self.addCleanup(endpoint.pubsub.stop)  # type: ignore[attr-defined]
            result.append(endpoint)
        return result

    async def settle(self) -> None:
        """Let subscriptions reach the medium before publishing (Redis answers SUBSCRIBE asynchronously)."""
        await deferLater(reactor, 0.05, lambda: None)

    async def test_provides_interface(self) -> None:
        [a] = await self.endpoints(1)
        self.assertTrue(verifyObject(IPubSub, a.pubsub))  # type: ignore[attr-defined]
        self.assertGreaterEqual(await a.pubsub.ping(), 0)  # type: ignore[attr-defined]

    async def test_payloads_arrive_intact_and_not_echoed(self) -> None:
        """Watchers get each publication of the others, payload intact; the publisher gets no echo."""
        a, b = await self.endpoints()
        for endpoint in (a, b):
            endpoint.pubsub.watch("room:1")
        await self.settle()
        payload = {"writes": [["f", {"nested": ["é", None, 1.5, 2**53 - 1]}, "conn-1@x", 1, 1000]], "clock": {}}
        large = {"clientId": "c", "state": {"blob": "x" * 1_000_000}, "clock": 1}
        await a.pubsub.publish("delta", "room:1", payload)
        await a.pubsub.publish("awareness", "room:1", large)
        await b.receives([("delta", "room:1", payload), ("awareness", "room:1", large)])
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(a.received, [])  # type: ignore[attr-defined]

    async def test_only_watched_documents(self) -> None:
        a, b = await self.endpoints()
        b.pubsub.watch("watched")
        b.pubsub.watch("dropped")
        b.pubsub.unwatch("dropped")
        await self.settle()
        for doc_id in ("other", "dropped", "watched"):
            await a.pubsub.publish("delta", doc_id, {"n": doc_id})
        await b.receives([("delta", "watched", {"n": "watched"})])

    async def test_stop_ends_delivery(self) -> None:
        a, b = await self.endpoints()
        b.pubsub.watch("d")
        await self.settle()
        await b.pubsub.stop()
        await a.pubsub.publish("delta", "d", {"n": 1})
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(b.received, [])  # type: ignore[attr-defined]


class LocalPubSubContractTests(PubSubContract, TestCase):
    def setUp(self) -> None:
        self.bus = LocalBus(reactor)

    def make(self) -> IPubSub:
        return LocalPubSub(self.bus)


class RedisPubSubContractTests(PubSubContract, TestCase):
    def setUp(self) -> None:
        self.url = shared_redis().url
        self.prefix = f"contract-{next(_prefixes)}:"

    def make(self) -> IPubSub:
        return RedisPubSub(reactor, self.url, prefix=self.prefix, timeout=1)


def raw_subscribe(port: int, pattern: str) -> socket.socket:
    """A plain Redis client PSUBSCRIBEd to C{pattern}, to see what goes over the wire."""
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    s.sendall(f"PSUBSCRIBE {pattern}\r\n".encode())
    s.recv(1024)
    return s


def publish_raw(port: int, channel: bytes, body: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
        raw.sendall(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(channel), channel, len(body), body))
        raw.recv(64)


class RedisTests(TestCase):
    async def test_channels_carry_the_prefix_and_cbor(self) -> None:
        redis = shared_redis()
        spy = raw_subscribe(redis.port, "my-prefix:*")
        self.addCleanup(spy.close)
        a = Endpoint(RedisPubSub(reactor, redis.url, prefix="my-prefix:", instance_id="inst-a", timeout=1))
        await a.start()
        self.addCleanup(a.pubsub.stop)
        await a.pubsub.publish("awareness", "room:7", {"k": 1})
        data = spy.recv(4096)
        self.assertIn(b"my-prefix:awareness:room:7", data)
        self.assertIn(b"inst-a", data)  # the instance id, inside the CBOR envelope

    async def test_garbage_is_dropped(self) -> None:
        """Non-CBOR, wrong shapes and unknown kinds on our channels are logged and dropped."""
        redis = shared_redis()
        b = Endpoint(RedisPubSub(reactor, redis.url, prefix="garbage:", timeout=1))
        await b.start()
        self.addCleanup(b.pubsub.stop)
        b.pubsub.watch("d")
        await deferLater(reactor, 0.05, lambda: None)
        publish_raw(redis.port, b"garbage:delta:d", b"\xff\xfe not cbor")
        publish_raw(redis.port, b"garbage:delta:d", b"\x01")  # CBOR, but not an envelope
        publish_raw(redis.port, b"garbage:bogus:d", cbor2.dumps({"i": "x", "p": {}}))  # no such kind
        other = RedisPubSub(reactor, redis.url, prefix="garbage:", timeout=1)
        await other.start(lambda *_: None, lambda: None)
        self.addCleanup(other.stop)
        await other.publish("delta", "d", {"after": "garbage"})
        await b.receives([("delta", "d", {"after": "garbage"})])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    async def test_unreachable_redis(self) -> None:
        """start() fails within the timeout, naming the address, and leaves nothing running."""
        started = time.monotonic()
        pubsub = RedisPubSub(reactor, f"redis://127.0.0.1:{free_port()}", timeout=1)
        with self.assertRaises(PubSubUnavailable) as caught:
            await pubsub.start(lambda *_: None, lambda: None)
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertIn("cannot reach Redis at 127.0.0.1:", str(caught.exception))

    async def test_unanswered_call_times_out_and_reconnects(self) -> None:
        """
        A Redis that takes connections but never answers: publish and ping fail with
        L{PubSubUnavailable} after the timeout, and the connection that owes the answers is
        dropped and made again (Redis answers in order, so nothing after it could get through).
        """
        connections: list[Protocol] = []

        class Silent(Protocol):
            def connectionMade(self) -> None:
                connections.append(self)

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pubsub = RedisPubSub(reactor, f"redis://127.0.0.1:{port.getHost().port}", timeout=0.2)
        await pubsub.start(lambda *_: None, lambda: None)  # no password, no database: nothing to answer
        self.addCleanup(pubsub.stop)
        self.assertEqual(len(connections), 2)  # the publisher and the subscriber
        with self.assertRaises(PubSubUnavailable) as caught:
            await pubsub.publish("delta", "d", {"n": 1})
        self.assertIn("did not answer publish within 0.2 s", str(caught.exception))

        async def unanswered_again() -> None:
            with self.assertRaises(PubSubUnavailable) as caught:
                await pubsub.ping()
            self.assertIn("did not answer ping within 0.2 s", str(caught.exception))

        await eventually(unanswered_again, within=5)  # "not connected" until the publisher is back
        self.assertGreaterEqual(len(connections), 3)

    async def test_outage(self) -> None:
        """
        While Redis is down, publish and ping fail at once; when it is back, both connections
        return by themselves, the subscriber subscribes again, and resync is asked for once.
        """
        redis = RedisServer()
        self.addCleanup(redis.destroy)
        redis.start()
        a, b = Endpoint(RedisPubSub(reactor, redis.url, timeout=1)), Endpoint(RedisPubSub(reactor, redis.url, timeout=1))
        for endpoint in (a, b):
            await endpoint.start()
            self.addCleanup(endpoint.pubsub.stop)
        b.pubsub.watch("d")
        redis.kill()
        await deferLater(reactor, 0.1, lambda: None)
        with self.assertRaises(PubSubUnavailable):
            await a.pubsub.publish("delta", "d", {"lost": True})
        with self.assertRaises(PubSubUnavailable):
            await a.pubsub.ping()
        redis.start()

        async def back() -> None:
            await a.pubsub.publish("delta", "d", {"n": 1})
            if not b.received:
                raise AssertionError("not relayed yet")
            if not a.resyncs:
                # A's subscriber reconnects on its own schedule, apart from A's publisher.
                raise AssertionError("A's subscriber not back yet")

        await eventually(back, within=15)
        self.assertEqual(b.received[0], ("delta", "d", {"n": 1}))
        self.assertEqual((b.resyncs, a.resyncs, b.pubsub.reconnects), (1, 1, 1))
