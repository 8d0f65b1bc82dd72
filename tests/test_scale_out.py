"""
Two instances of the real service sharing one PostgreSQL and one Redis, a real WebSocket client
on each: they converge, presence crosses, and a Redis outage loses nothing.
"""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet import reactor

from synckit.pubsub.redis import RedisPubSub
from synckit.service import SyncKitService
from tests.services import RedisServer, shared_postgres, shared_redis
from tests.test_durability import open_document, storage, write
from tests.test_postgres import eventually
from tests.wsclient import RecordingClient, ServiceCase

_prefixes = itertools.count(1)


class ScaleOutCase(ServiceCase):
    async def instances(self, redis_url: str) -> list[tuple[SyncKitService, RecordingClient]]:
        """Two services on one database and one Redis (a channel prefix of this test's own), a client on each."""
        database = shared_postgres().new_database()
        prefix = f"scale-out-{next(_prefixes)}:"
        pairs = []
        for _ in range(2):
            pubsub = RedisPubSub(reactor, redis_url, prefix=prefix, timeout=1)
            service, port = await self.started(storage=storage(database), pubsub=pubsub)
            pairs.append((service, await self.client(port)))
        return pairs


class ConvergenceTests(ScaleOutCase):
    async def test_writes_cross_instances_live(self) -> None:
        (_, alice), (_, bob) = await self.instances(shared_redis().url)
        for client in (alice, bob):
            await open_document(client, "doc")
        self.assertEqual((await write(alice, "doc", "a1", {"title": "from alice"}))["type"], "ack")
        delta = await bob.wait_for(lambda m: m["type"] == "delta" and m["field"] == "title")
        self.assertEqual(delta["value"], "from alice")
        self.assertEqual((await write(bob, "doc", "b1", {"body": "from bob"}))["type"], "ack")
        await alice.wait_for(lambda m: m["type"] == "delta" and m["field"] == "body")

    async def test_concurrent_writes_converge(self) -> None:
        """Both write the same fields at once: both instances, and storage, end with the same values."""
        (_, alice), (_, bob) = await self.instances(shared_redis().url)
        for client in (alice, bob):
            await open_document(client, "doc")
        for i in range(20):
            alice.send("delta", {"id": f"a{i}", "documentId": "doc", "delta": {f"f{i % 5}": f"alice-{i}"}, "vectorClock": {}})
            bob.send("delta", {"id": f"b{i}", "documentId": "doc", "delta": {f"f{i % 5}": f"bob-{i}"}, "vectorClock": {}})
        for client, name in ((alice, "a"), (bob, "b")):
            for i in range(20):
                await client.wait_for(lambda m, i=i: m["type"] == "ack" and m["messageId"] == f"{name}{i}")

        async def same() -> dict[str, Any]:
            states = [await open_document(client, "doc") for client in (alice, bob)]
            self.assertEqual(states[0], states[1])
            return states[0]

        state = await eventually(same, within=5)
        self.assertEqual(sorted(state), [f"f{i}" for i in range(5)])

    async def test_presence_crosses_instances(self) -> None:
        (_, alice), (_, bob) = await self.instances(shared_redis().url)
        alice.send("awareness_subscribe", {"documentId": "doc"})
        await alice.wait_type("awareness_state")
        bob.send("awareness_update", {"documentId": "doc", "clientId": "bob", "state": {"cursor": 3}, "clock": 1})
        update = await alice.wait_for(lambda m: m["type"] == "awareness_update" and m["clientId"] == "bob")
        self.assertEqual(update["state"], {"cursor": 3})


class RedisOutageTests(ScaleOutCase):
    async def test_redis_outage_loses_nothing(self) -> None:
        """
        While Redis is down, writes are still acknowledged (PostgreSQL has them) but do not reach
        the other instance; once Redis is back, that instance re-reads its cached documents and
        sends its clients what they missed, and live relay resumes.
        """
        redis = RedisServer()
        self.addCleanup(redis.destroy)
        redis.start()
        (_, alice), (_, bob) = await self.instances(redis.url)
        for client in (alice, bob):
            await open_document(client, "doc")

        redis.kill()
        self.assertEqual((await write(alice, "doc", "during", {"missed": 1}))["type"], "ack")
        redis.start()
        delta = await bob.wait_for(lambda m: m["type"] == "delta" and m["field"] == "missed", timeout=20)
        self.assertEqual(delta["value"], 1)

        attempts = itertools.count()

        async def relayed() -> None:
            n = next(attempts)
            self.assertEqual((await write(alice, "doc", f"after-{n}", {"live": n}))["type"], "ack")
            await bob.wait_for(lambda m: m["type"] == "delta" and m["field"] == "live" and m["value"] == n, timeout=1)

        await eventually(relayed, within=20)
