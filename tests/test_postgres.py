"""
PostgreSQL specifics, on real servers: migrations, the reference's row shapes both ways, data
PostgreSQL refuses, and what an outage or a stalled server does to calls.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any, Awaitable, Callable

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from txpostgres import txpostgres

from synckit.storage import postgres, schema
from synckit.storage.interface import DocumentWrites, FieldWrite, StorageRefused, StorageUnavailable
from synckit.storage.postgres import PostgresStorage
from synckit.sync.document import Text
from synckit.sync.fugue import FugueText
from tests.helpers import text_state
from tests.services import PostgresServer, shared_postgres
from tests.wsclient import ServiceCase


async def connection(url: str) -> txpostgres.Connection:
    conn = txpostgres.Connection(reactor)
    await conn.connect(url)
    return conn


def watched_connections() -> list[txpostgres.Connection]:
    """The PostgreSQL connections the reactor still watches: none once a storage has stopped."""
    return [s for s in reactor.getReaders() + reactor.getWriters() if isinstance(s, txpostgres.Connection)]


async def eventually(check: Callable[[], Awaitable[Any]], within: float = 15.0) -> Any:
    """C{check}'s result once it stops raising, polling every 0.1 s up to C{within} seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await check()
        except Exception:
            if time.monotonic() > deadline:
                raise
        await deferLater(reactor, 0.1, lambda: None)


class MigrationTests(TestCase):
    def setUp(self) -> None:
        self.server = shared_postgres()
        self.url = self.server.new_database()

    async def migrator(self) -> schema.Migrator:
        conn = await connection(self.url)
        self.addCleanup(conn.close)
        return schema.Migrator(conn)

    async def test_migrate_is_idempotent(self) -> None:
        """A fresh database is brought to the latest version; a second run does nothing."""
        migrator = await self.migrator()
        applied = await migrator.migrate()
        self.assertEqual([m.version for m in applied], list(range(1, schema.latest() + 1)))
        self.assertEqual(await migrator.migrate(), [])
        rows = self.server.execute("SELECT version, name FROM synckit_migrations ORDER BY version", self.url.rsplit("/", 1)[1])
        self.assertEqual([r[0] for r in rows], list(range(1, schema.latest() + 1)))

    async def test_concurrent_migrations_take_turns(self) -> None:
        """Two processes migrating at once apply each migration exactly once between them."""
        first, second = await self.migrator(), await self.migrator()
        results = await DeferredList(
            [Deferred.fromCoroutine(first.migrate()), Deferred.fromCoroutine(second.migrate())], fireOnOneErrback=True
        )
        applied = sorted(m.version for _, migrations in results for m in migrations)
        self.assertEqual(applied, list(range(1, schema.latest() + 1)))

    async def test_server_refuses_an_old_schema(self) -> None:
        """Without --auto-migrate, an unmigrated database stops start-up with what to run."""
        storage = PostgresStorage(reactor, self.url, pool_size=1)
        with self.assertRaises(schema.SchemaError) as caught:
            await storage.start()
        self.assertIn("synckit-migrate", str(caught.exception))

    async def test_server_refuses_a_newer_schema(self) -> None:
        await (await self.migrator()).migrate()
        self.server.execute("INSERT INTO synckit_migrations (version, name) VALUES (999, 'future')", self.url.rsplit("/", 1)[1])
        storage = PostgresStorage(reactor, self.url, pool_size=1)
        with self.assertRaises(schema.SchemaError) as caught:
            await storage.start()
        self.assertIn("upgrade synckit", str(caught.exception))

    async def test_unreachable_database(self) -> None:
        """Start-up fails with a one-line reason naming the database, without its password."""
        storage = PostgresStorage(reactor, "postgresql://u:secret@127.0.0.1:1/db", pool_size=1, timeout=2)
        with self.assertRaises(StorageUnavailable) as caught:
            await storage.start()
        self.assertIn("cannot connect to PostgreSQL at 127.0.0.1:1/db", str(caught.exception))
        self.assertNotIn("secret", str(caught.exception))


class ReferenceRowsTests(TestCase):
    """Rows as the reference server writes and reads them."""

    async def start_storage(self) -> PostgresStorage:
        self.server = shared_postgres()
        self.url = self.server.new_database()
        self.database = self.url.rsplit("/", 1)[1]
        storage = PostgresStorage(reactor, self.url, pool_size=1, auto_migrate=True)
        await storage.start()
        self.addCleanup(storage.stop)
        return storage

    async def test_reads_the_references_rows(self) -> None:
        storage = await self.start_storage()
        state = {"id": "room:1", "fields": {"title": "from the reference", "n": 0}}
        self.server.execute(f"INSERT INTO documents (id, state) VALUES ('room:1', '{json.dumps(state)}')", self.database)
        self.server.execute(
            "INSERT INTO vector_clocks (document_id, client_id, clock_value) VALUES ('room:1', 'conn-1', 31)", self.database
        )
        stored = await storage.load("room:1")
        self.assertEqual((stored.fields, stored.clock, stored.stamps), (state["fields"], {"conn-1": 31}, {}))

    async def test_writes_rows_the_reference_reads(self) -> None:
        """
        Once brought up to date, state.id and state.fields hold the visible fields (no
        tombstones, no stamps); deltas log each write.
        """
        storage = await self.start_storage()
        await storage.save([DocumentWrites("d", [FieldWrite("a", 1, "w1", 1, 1000), FieldWrite("b", 2, "w1", 2, 1000)])])
        await storage.save([DocumentWrites("d", [FieldWrite("b", {"__deleted": True}, "w1", 3, 1001)])])
        self.assertEqual(await storage.sync_state(), 1)
        [(state,)] = self.server.execute("SELECT state FROM documents WHERE id = 'd'", self.database)
        self.assertEqual((state["id"], state["fields"]), ("d", {"a": 1}))
        log = self.server.execute("SELECT operation_type, field_path, value FROM deltas ORDER BY clock_value", self.database)
        self.assertEqual(log, [("set", "a", 1), ("set", "b", 2), ("delete", "b", None)])

    async def test_data_postgresql_refuses(self) -> None:
        """A NUL character, which JSONB cannot hold, is refused as data, not as an outage."""
        storage = await self.start_storage()
        with self.assertRaises(StorageRefused):
            await storage.save([DocumentWrites("d", [FieldWrite("a", "nul\u0000here", "w1", 1, 1000)])])
        await storage.save([DocumentWrites("d", [FieldWrite("a", "fine", "w1", 2, 1001)])])
        self.assertEqual((await storage.load("d")).fields, {"a": "fine"})

    async def test_long_ids_through_the_references_view(self) -> None:
        """
        Migration 004 widens the id columns to the protocol's 256 characters: such a document is
        stored, and the reference's documents_with_clocks view, made again over the wider
        columns, reads it.
        """
        storage = await self.start_storage()
        await storage.save([DocumentWrites("d" * 256, [FieldWrite("a", 1, "w1", 1, 1000)])])
        await storage.sync_state()
        rows = self.server.execute("SELECT id, state->'fields', vector_clock FROM documents_with_clocks", self.database)
        self.assertEqual(rows, [("d" * 256, {"a": 1}, {"w1": 1})])


class ConnectionKeptTests(TestCase):
    """
    Errors PostgreSQL reports on a connection that stays fine: the call fails or is retried as
    its error calls for, and the connection is kept.  Taken for a dead connection, one dropped
    it, and with a pool of one the retry failed with StorageUnavailable.
    """

    async def start_storage(self, url: str) -> PostgresStorage:
        storage = PostgresStorage(reactor, url, pool_size=1, timeout=5, auto_migrate=True)
        await storage.start()
        self.addCleanup(storage.stop)
        return storage

    async def test_instances_save_text_at_once(self) -> None:
        """
        Two instances merge their edits into the same stored text: the second save finds the
        text changed (compare-and-set: a serialization failure), reads it, merges again and
        stores both edits, on the connection it has.
        """
        url = shared_postgres().new_database()
        a = await self.start_storage(url)
        b = await self.start_storage(url)
        base = Text(FugueText.parse(text_state("alice", "Hello")), 1)
        await a.save([DocumentWrites("t", text=base)])
        edits = {}
        for storage, client, typed in ((a, "alice", "X"), (b, "bob", "Y")):
            edit = FugueText.parse(base.state.to_json())
            edit.merge(FugueText.parse(text_state(client, typed, clock=5)))
            edits[typed] = edit
            await storage.save([DocumentWrites("t", text=Text(edit, 2), text_base=base)])
        expected = FugueText.parse(base.state.to_json())
        for edit in edits.values():
            expected.merge(edit)
        self.assertEqual((await a.load("t")).text.state.text(), expected.text())
        self.assertEqual((a.reconnects, b.reconnects), (0, 0))

    async def locked_out(self, setting: str) -> tuple[PostgresStorage, StorageUnavailable]:
        """
        A storage whose connection has C{setting}, and the error of a save that waits on a
        lock another connection holds; the next save, once the lock is gone, goes through.
        """
        url = shared_postgres().new_database()
        storage = await self.start_storage(f"{url}?options=-c%20{setting}%3D200")
        await storage.save([DocumentWrites("d", [FieldWrite("a", 1, "w1", 1, 1000)])])
        holder = psycopg2.connect(url)
        self.addCleanup(holder.close)
        holder.cursor().execute("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE")
        with self.assertRaises(StorageUnavailable) as caught:
            await storage.save([DocumentWrites("d", [FieldWrite("a", 2, "w1", 2, 1001)])])
        holder.rollback()
        await storage.save([DocumentWrites("d", [FieldWrite("a", 3, "w1", 3, 1002)])])
        self.assertEqual((await storage.load("d")).fields, {"a": 3})
        return storage, caught.exception

    async def test_lock_timeout(self) -> None:
        """A save refused for its lock_timeout fails as an outage, and keeps its connection."""
        storage, error = await self.locked_out("lock_timeout")
        self.assertIn("lock timeout", str(error))
        self.assertEqual(storage.reconnects, 0)

    async def test_statement_timeout(self) -> None:
        """
        A save PostgreSQL cancels (its statement_timeout) fails as an outage that says so, not
        as an unexpected error.
        """
        storage, error = await self.locked_out("statement_timeout")
        self.assertIn("cancelled the save (statement_timeout", str(error))
        self.assertEqual(storage.reconnects, 0)


class LinearSaveTests(ServiceCase):
    """Item 4 of issue 11: one message can no longer hold PostgreSQL's writes for minutes."""

    async def test_too_many_ops_refused_before_saving(self) -> None:
        """
        Through the real service on PostgreSQL: a delta_batch of 30,000 ops, and a delta of
        more fields than max-ops-per-message, are refused with TOO_MANY_OPERATIONS and nothing
        is saved; a batch at the limit is saved and acknowledged.
        """
        url = shared_postgres().new_database()
        _, port = await self.started(storage=PostgresStorage(reactor, url, pool_size=1, auto_migrate=True))
        client = await self.client(port)
        ops = [{"type": "set", "field": f"f{i}", "value": i} for i in range(30_000)]
        client.send("delta_batch", {"id": "big", "documentId": "d", "deltas": ops})
        error = await client.wait_type("error")
        self.assertEqual((error["details"]["code"], error["details"]["limit"]), ("TOO_MANY_OPERATIONS", 1000))
        self.assertIn("30000", error["error"])
        client.send("delta", {"id": "wide", "documentId": "d", "delta": {f"f{i}": i for i in range(1001)}})
        self.assertEqual((await client.wait_type("error"))["details"]["code"], "TOO_MANY_OPERATIONS")
        check = PostgresStorage(reactor, url, pool_size=1)
        await check.start()
        self.addCleanup(check.stop)
        self.assertIsNone(await check.load("d"))
        client.send("delta_batch", {"id": "fits", "documentId": "d", "deltas": ops[:1000]})
        await client.wait_for(lambda m: m["type"] == "ack" and m["messageId"] == "fits", timeout=30)
        self.assertEqual(len((await check.load("d")).fields), 1000)

    async def test_save_writes_has_no_per_write_loop(self) -> None:
        """
        How linearity is shown without timing: the installed synckit_save_writes is made of
        set-based statements only (no LOOP), each writing each table once per save; 002's
        version looped over the writes, copying the fields and stamps objects once per write.
        Since 005 it does not write documents.state at all (tests/test_field_rows.py shows a
        write touching only its rows).  (The storage contract saves 30,000 writes in one call,
        which took minutes with 002's.)
        """
        url = shared_postgres().new_database()
        storage = PostgresStorage(reactor, url, pool_size=1, auto_migrate=True)
        await storage.start()
        self.addCleanup(storage.stop)
        [(source,)] = shared_postgres().execute(
            "SELECT prosrc FROM pg_proc WHERE proname = 'synckit_save_writes'", url.rsplit("/", 1)[1]
        )
        self.assertNotIn("LOOP", source.upper())
        self.assertNotIn("UPDATE DOCUMENTS", source.upper())

    async def test_delta_log_cleanup_in_batches(self) -> None:
        """
        Cleanup deletes delta log rows logged before the cut-off, in transactions of at most
        CLEANUP_BATCH rows, until none is left; newer rows stay.
        """
        self.patch(postgres, "CLEANUP_BATCH", 2)
        server = shared_postgres()
        url = server.new_database()
        database = url.rsplit("/", 1)[1]
        storage = PostgresStorage(reactor, url, pool_size=1, auto_migrate=True)
        await storage.start()
        self.addCleanup(storage.stop)
        await storage.save([DocumentWrites("d", [FieldWrite(f"f{i}", i, "w1", i + 1, 1000) for i in range(7)])])
        server.execute("UPDATE deltas SET timestamp = NOW() - INTERVAL '40 days' WHERE clock_value <= 5", database)
        cleaned = await storage.cleanup(time.time() - 30 * 86400, 0)
        self.assertEqual(cleaned.deltas, 5)
        rows = server.execute("SELECT field_path FROM deltas ORDER BY clock_value", database)
        self.assertEqual(rows, [("f5",), ("f6",)])


class OutageTests(TestCase):
    """A private PostgreSQL, killed and stalled under a running storage."""

    async def start_storage(self) -> PostgresStorage:
        self.server = PostgresServer()
        self.addCleanup(self.server.destroy)
        self.server.start()
        storage = PostgresStorage(reactor, self.server.url, pool_size=2, timeout=1, auto_migrate=True)
        await storage.start()
        self.addCleanup(storage.stop)
        return storage

    async def test_kill_and_restart(self) -> None:
        """
        While PostgreSQL is down, calls fail with StorageUnavailable at once; after it is back,
        the pool reconnects by itself and nothing saved before is missing.
        """
        storage = await self.start_storage()
        await storage.save([DocumentWrites("d", [FieldWrite("before", 1, "w1", 1, 1000)])])
        self.server.kill()
        started = time.monotonic()
        with self.assertRaises(StorageUnavailable):
            await storage.save([DocumentWrites("d", [FieldWrite("during", 1, "w1", 2, 1001)])])
        self.assertLess(time.monotonic() - started, 1.5)
        with self.assertRaises(StorageUnavailable):
            await storage.load("d")
        self.server.start()
        await eventually(lambda: storage.save([DocumentWrites("d", [FieldWrite("after", 1, "w1", 3, 1002)])]))
        self.assertEqual((await storage.load("d")).fields, {"before": 1, "after": 1})
        self.assertGreaterEqual(storage.reconnects, 1)

    async def test_stalled_server_times_out(self) -> None:
        """A PostgreSQL that stops answering (SIGSTOP) fails calls after the timeout, not never."""
        storage = await self.start_storage()
        self.server.signal_all(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with self.assertRaises(StorageUnavailable) as caught:
                await storage.ping()
            self.assertLess(time.monotonic() - started, 3)
            self.assertIn("within 1 s", str(caught.exception))
        finally:
            self.server.signal_all(signal.SIGCONT)
        await eventually(storage.ping)

    async def test_stop_while_connecting(self) -> None:
        """
        Stopping while connection attempts wait on a server that accepted but never answered
        unwatches their sockets before closing them: the reactor is left with none of them, and
        with no stale descriptor to trip over later (an epoll reactor raises EBADF there).
        """
        silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        storage = PostgresStorage(reactor, f"postgresql://u@127.0.0.1:{silent.getHost().port}/db", pool_size=2, timeout=0.5)
        starting = storage.start()
        await deferLater(reactor, 0.1, lambda: None)
        await storage.stop()
        with self.assertRaises(StorageUnavailable):
            await starting
        self.assertEqual(watched_connections(), [])

    async def test_stop_while_reconnecting(self) -> None:
        """
        A stop that lands on a reconnection attempt under way (PostgreSQL gone, and its port
        taken by a server that accepts and never answers) ends the attempt instead of failing:
        txpostgres cannot cancel it, so closing the connection is what ends it.
        """
        storage = await self.start_storage()
        self.server.kill()
        silent = reactor.listenTCP(self.server.port, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        with self.assertRaises(StorageUnavailable):
            await storage.ping()
        await deferLater(reactor, 0.1, lambda: None)
        await storage.stop()
        self.assertEqual(watched_connections(), [])
