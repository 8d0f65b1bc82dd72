"""
The real service on PostgreSQL, with real WebSocket clients: acknowledged writes survive a
restart and a ``kill -9``, and a PostgreSQL outage refuses writes without losing any.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

from twisted.internet import reactor

from synckit.storage.postgres import PostgresStorage
from tests.services import PostgresServer, free_port, shared_postgres
from tests.test_postgres import eventually
from tests.wsclient import RecordingClient, ServiceCase

ROOT = os.path.join(os.path.dirname(__file__), "..")


def storage(url: str, **options: Any) -> PostgresStorage:
    return PostgresStorage(reactor, url, pool_size=2, auto_migrate=True, **options)


async def open_document(client: RecordingClient, doc_id: str) -> dict[str, Any]:
    client.send("sync_request", {"id": f"open-{doc_id}", "documentId": doc_id})
    return (await client.wait_for(lambda m: m["type"] == "sync_response" and m["requestId"] == f"open-{doc_id}"))["state"]


async def write(client: RecordingClient, doc_id: str, message_id: str, delta: dict[str, Any]) -> dict[str, Any]:
    """Send a delta and return its answer: the ack, or the error about it."""
    client.send("delta", {"id": message_id, "documentId": doc_id, "delta": delta, "vectorClock": {}})
    return await client.wait_for(
        lambda m: (m["type"] == "ack" and m["messageId"] == message_id) or m["type"] == "error"
    )


class DurabilityTests(ServiceCase):
    async def test_restart_keeps_acknowledged_writes(self) -> None:
        url = shared_postgres().new_database()
        service, port = await self.started(storage=storage(url))
        client = await self.client(port)
        await open_document(client, "doc")
        for i in range(10):
            self.assertEqual((await write(client, "doc", f"w{i}", {f"f{i}": i}))["type"], "ack")
        await service.stopService()

        _, port = await self.started(storage=storage(url))
        self.assertEqual(await open_document(await self.client(port), "doc"), {f"f{i}": i for i in range(10)})

    async def test_kill_9_loses_no_acknowledged_write(self) -> None:
        """
        ``twistd synckit`` killed with SIGKILL right after its acks, then started again on the
        same database: every acknowledged write is there.
        """
        url = shared_postgres().new_database()
        port = free_port()
        server = self.twistd(port, url)
        client = await self.client(port)
        await open_document(client, "doc")
        for i in range(50):
            client.send("delta", {"id": f"w{i}", "documentId": "doc", "delta": {f"f{i}": i}, "vectorClock": {}})
        for i in range(50):
            await client.wait_for(lambda m, i=i: m["type"] == "ack" and m["messageId"] == f"w{i}")
        server.kill()
        server.wait()

        self.twistd(port, url)
        self.assertEqual(await open_document(await self.client(port), "doc"), {f"f{i}": i for i in range(50)})

    def twistd(self, port: int, url: str) -> subprocess.Popen:
        """Start ``twistd -n synckit`` on C{port} and wait until it answers /health."""
        env = dict(os.environ, SYNCKIT_AUTH_REQUIRED="false")
        command = [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "synckit"]
        command += ["--port", str(port), "--host", "127.0.0.1", "--database", url, "--auto-migrate"]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                return process
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("twistd synckit did not start") from None
                time.sleep(0.1)


class OutageTests(ServiceCase):
    async def test_postgresql_outage(self) -> None:
        """
        While PostgreSQL is down: writes get an error and no ack, and are not shown to anyone;
        reads of cached documents go on; /health stays 200 and /health/ready says 503.  Once it
        is back, writes are acknowledged again, and every acknowledged write is in the database.
        """
        database = PostgresServer()
        self.addCleanup(database.destroy)
        database.start()
        _, port = await self.started(storage=storage(database.url, timeout=1))
        writer, reader = await self.client(port), await self.client(port)
        for client in (writer, reader):
            await open_document(client, "doc")
        self.assertEqual((await write(writer, "doc", "before", {"a": 1}))["type"], "ack")

        database.kill()
        error = await write(writer, "doc", "during", {"a": 2, "b": 2})
        self.assertEqual((error["type"], error["details"]["code"]), ("error", "STORAGE_UNAVAILABLE"))
        self.assertEqual(await open_document(reader, "doc"), {"a": 1})
        self.assertEqual((await self.get(port, "/health"))[0], 200)
        code, ready = await self.get(port, "/health/ready")
        self.assertEqual((code, ready["storage"]["ok"]), (503, False))

        database.start()

        async def acknowledged() -> None:
            answer = await write(writer, "doc", "after", {"c": 3})
            if answer["type"] != "ack":
                raise AssertionError(answer)

        await eventually(acknowledged)
        self.assertEqual((await self.get(port, "/health/ready"))[0], 200)
        check = storage(database.url)
        await check.start()
        self.addCleanup(check.stop)
        self.assertEqual((await check.load("doc")).fields, {"a": 1, "c": 3})
