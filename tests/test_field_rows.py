"""
Field rows (migration 005): a write touches only the rows of the fields it writes, whatever the
size of its document; documents.state, the copy the reference reads, is brought up to date in
the background, by the service's timer and at shutdown; existing databases are migrated.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from txpostgres import txpostgres

from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.service import SyncKitService
from synckit.storage import postgres, schema
from synckit.storage.interface import DocumentWrites, FieldWrite, StorageUnavailable, StoredDocument
from synckit.storage.memory import MemoryStorage
from synckit.storage.postgres import PostgresStorage
from synckit.sync.document import TOMBSTONE
from tests.helpers import config
from tests.services import shared_postgres

#: the tables a field write may change, and how
_TABLES = ("documents", "synckit_fields", "vector_clocks", "deltas")


def fields(doc_id: str, n: int, counter: int = 1, prefix: str = "f") -> list[DocumentWrites]:
    return [DocumentWrites(doc_id, [FieldWrite(f"{prefix}{i}", i, "w1", counter + i, 1000 + i) for i in range(n)])]


def record(writes: list[DocumentWrites]) -> str:
    """The saves' argument to synckit_save, as PostgresStorage sends it."""
    return json.dumps([postgres._record(doc, None, None) for doc in writes])


class Database:
    """A fresh migrated database of the shared server, with a synchronous connection to it."""

    def __init__(self) -> None:
        self.server = shared_postgres()
        self.url = self.server.new_database()
        self.name = self.url.rsplit("/", 1)[1]

    def execute(self, sql: str) -> list[tuple]:
        return self.server.execute(sql, self.name)

    def changed_by(self, sql: str, argument: Any) -> dict[str, tuple[int, int, int]]:
        """
        Run C{sql} in a transaction and return, per table, the rows it inserted, updated and
        deleted, as PostgreSQL counts them for the transaction itself (pg_stat_xact_user_tables):
        exact, and whatever else the machine does.
        """
        conn = psycopg2.connect(self.url)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, (argument,))
                cur.execute(
                    "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_xact_user_tables WHERE relname = ANY(%s)",
                    (list(_TABLES),),
                )
                counts = {name: (ins, upd, dele) for name, ins, upd, dele in cur.fetchall()}
            conn.commit()
        finally:
            conn.close()
        return {name: counts.get(name, (0, 0, 0)) for name in _TABLES}


class FieldRowsTests(TestCase):
    async def start_storage(self) -> PostgresStorage:
        self.db = Database()
        storage = PostgresStorage(reactor, self.db.url, pool_size=2, auto_migrate=True)
        await storage.start()
        self.addCleanup(storage.stop)
        return storage

    async def test_a_write_touches_only_its_rows(self) -> None:
        """
        A write of one field to a document of 10,000 fields inserts or updates exactly its own
        field row, its writer's clock entry and one delta log row, as in a document of 10
        fields; documents (and its state, of every field) is not written at all.  Before
        migration 005 the same write rewrote the whole state: every field and every stamp.
        """
        storage = await self.start_storage()
        for doc_id, size in (("small", 10), ("large", 10_000)):
            await storage.save(fields(doc_id, size))
        await storage.sync_state()
        for doc_id, size in (("small", 10), ("large", 10_000)):
            update = [DocumentWrites(doc_id, [FieldWrite("f3", "new", "w2", 1, 50_000)])]
            insert = [DocumentWrites(doc_id, [FieldWrite("new", "x", "w2", 2, 50_001)])]
            self.assertEqual(
                self.db.changed_by("SELECT synckit_save(%s)", record(update)),
                {"documents": (0, 0, 0), "synckit_fields": (0, 1, 0), "vector_clocks": (1, 0, 0), "deltas": (1, 0, 0)},
                doc_id,
            )
            self.assertEqual(
                self.db.changed_by("SELECT synckit_save(%s)", record(insert)),
                {"documents": (0, 0, 0), "synckit_fields": (1, 0, 0), "vector_clocks": (0, 1, 0), "deltas": (1, 0, 0)},
                doc_id,
            )
        stored = await storage.load("large")
        self.assertEqual((len(stored.fields), stored.fields["f3"], stored.fields["new"]), (10_001, "new", "x"))

    async def test_an_older_write_changes_no_row(self) -> None:
        """A write that loses to the stored stamp updates no field row (it is logged, as before)."""
        storage = await self.start_storage()
        await storage.save(fields("d", 3, counter=10))
        stale = [DocumentWrites("d", [FieldWrite("f1", "stale", "w1", 1, 1)])]
        changed = self.db.changed_by("SELECT synckit_save(%s)", record(stale))
        self.assertEqual((changed["synckit_fields"], changed["deltas"]), ((0, 0, 0), (1, 0, 0)))
        self.assertEqual((await storage.load("d")).fields["f1"], 1)

    async def test_state_is_brought_up_to_date(self) -> None:
        """
        Writes go to documents.state only when sync_state runs, once per document however many
        writes it had: sets and deletes alike, and then state.fields is what a load gives.  A
        second run finds nothing to do.
        """
        storage = await self.start_storage()
        await storage.save(fields("d", 5))
        await storage.save([DocumentWrites("e", [FieldWrite("only", True, "w1", 1, 1000)])])
        self.assertEqual(self.db.execute("SELECT state->'fields' FROM documents WHERE id = 'd'"), [({},)])
        self.assertEqual(await storage.sync_state(), 2)
        await storage.save([DocumentWrites("d", [FieldWrite("f0", TOMBSTONE, "w2", 1, 5000), FieldWrite("f1", "b", "w2", 2, 5000)])])
        [(before,)] = self.db.execute("SELECT state FROM documents WHERE id = 'd'")
        self.assertEqual(before["fields"], {f"f{i}": i for i in range(5)})
        self.assertEqual(await storage.sync_state(), 1)
        self.assertEqual(await storage.sync_state(), 0)
        [(state,)] = self.db.execute("SELECT state FROM documents WHERE id = 'd'")
        self.assertEqual(state, {"id": "d", "fields": {"f1": "b", "f2": 2, "f3": 3, "f4": 4}})
        self.assertEqual(state["fields"], (await storage.load("d")).fields)
        self.assertEqual(self.db.execute("SELECT count(*) FROM synckit_fields WHERE pending"), [(0,)])

    async def test_sync_in_batches(self) -> None:
        """Many documents behind are brought up to date SYNC_BATCH at a time, all in one call."""
        self.patch(postgres, "SYNC_BATCH", 2)
        storage = await self.start_storage()
        for i in range(5):
            await storage.save(fields(f"d{i}", 1))
        self.assertEqual(await storage.sync_state(), 5)
        self.assertEqual(self.db.execute("SELECT count(*) FROM documents WHERE state->'fields' = '{\"f0\": 0}'"), [(5,)])

    async def test_the_reference_reads_and_writes_after_sync(self) -> None:
        """
        After a sync the reference's reading of documents.state (its fields, and the
        documents_with_clocks view) holds our writes; what the reference then writes into
        state.fields (a new field, a changed one, a removed one) is what we load, with the
        stamps we had.
        """
        storage = await self.start_storage()
        await storage.save([DocumentWrites("d", [FieldWrite("a", 1, "w1", 1, 1000), FieldWrite("b", 2, "w1", 2, 1000)])])
        await storage.sync_state()
        self.assertEqual(
            self.db.execute("SELECT state->'fields', vector_clock FROM documents_with_clocks WHERE id = 'd'"),
            [({"a": 1, "b": 2}, {"w1": 2})],
        )
        self.db.execute("UPDATE documents SET state = jsonb_set(state, '{fields}', '{\"a\": \"ref\", \"c\": 3}')")
        stored = await storage.load("d")
        self.assertEqual(stored.fields, {"a": "ref", "c": 3})
        self.assertEqual(stored.stamps, {"a": (1000, 1, "w1"), "b": (1000, 2, "w1")})

    async def test_a_sync_never_waits_on_a_save(self) -> None:
        """
        While a save's transaction holds a field row, a sync folds the others and returns at
        once (it would block here otherwise: the statement timeout says so); the held write
        stays pending, and the next sync, after the save commits, folds it: nothing is lost.
        """
        storage = await self.start_storage()
        await storage.save(fields("d", 2))
        saving = psycopg2.connect(self.db.url)
        self.addCleanup(saving.close)
        with saving.cursor() as cur:
            cur.execute("SELECT synckit_save(%s)", (record([DocumentWrites("d", [FieldWrite("f0", "held", "w2", 1, 9000)])]),))
        await storage.save([DocumentWrites("d", [FieldWrite("f1", "free", "w3", 1, 9000)])])
        syncing = psycopg2.connect(self.db.url)
        self.addCleanup(syncing.close)
        syncing.autocommit = True
        with syncing.cursor() as cur:
            cur.execute("SET statement_timeout = '5s'")
            cur.execute("SELECT synckit_sync_state(100)")
            self.assertEqual(cur.fetchone(), (1,))
        self.assertEqual(self.db.execute("SELECT state->'fields' FROM documents"), [({"f1": "free"},)])
        saving.commit()
        self.assertEqual(await storage.sync_state(), 1)
        self.assertEqual(self.db.execute("SELECT state->'fields' FROM documents"), [({"f0": "held", "f1": "free"},)])

    async def test_stop_brings_state_up_to_date(self) -> None:
        """A storage that stops leaves documents.state holding every write it saved."""
        storage = await self.start_storage()
        await storage.save(fields("d", 3))
        await storage.stop()
        self.assertEqual(self.db.execute("SELECT state->'fields' FROM documents"), [({"f0": 0, "f1": 1, "f2": 2},)])

    async def test_pending_tombstones_are_not_collected(self) -> None:
        """
        The cleanup function leaves a tombstone still pending (its field is still in
        documents.state, so forgetting the row would bring it back); storage's cleanup brings
        the state up to date first, and then collects it.
        """
        storage = await self.start_storage()
        await storage.save(fields("d", 2))
        await storage.sync_state()
        await storage.save([DocumentWrites("d", [FieldWrite("f0", TOMBSTONE, "w1", 9, 2000)])])
        self.assertEqual(self.db.execute("SELECT deltas, documents, tombstones FROM synckit_cleanup(to_timestamp(0), 10000, 10)"), [(0, 0, 0)])
        self.assertEqual((await storage.load("d")).fields, {"f1": 1})
        cleaned = await storage.cleanup(0, 10.0)
        self.assertEqual(cleaned.documents, 1)
        stored = await storage.load("d")
        self.assertEqual((stored.fields, set(stored.stamps)), ({"f1": 1}, {"f1"}))
        self.assertEqual(self.db.execute("SELECT state->'fields' FROM documents"), [({"f1": 1},)])

    async def test_long_field_names(self) -> None:
        """Field names far longer than a btree entry holds are stored and read back: rows are keyed by their md5."""
        storage = await self.start_storage()
        name = "x" * 100_000 + "".join(chr(0x4E00 + i) for i in range(5000))
        await storage.save([DocumentWrites("d", [FieldWrite(name, 1, "w1", 1, 1000), FieldWrite(name + "y", 2, "w1", 2, 1000)])])
        stored = await storage.load("d")
        self.assertEqual(stored.fields, {name: 1, name + "y": 2})


class MigrationTests(TestCase):
    async def test_existing_documents_move_to_rows(self) -> None:
        """
        A database at version 4 holding documents with stamps in documents.state, tombstones
        included, and one the reference wrote (no stamps), loads the same after migration 005:
        fields, stamps and clock; the stamps leave documents.state, and the rows are not
        pending (the state already holds them).
        """
        db = Database()
        conn = txpostgres.Connection(reactor)
        await conn.connect(db.url)
        self.addCleanup(conn.close)
        everything = schema.migrations()
        self.patch(schema, "migrations", lambda: everything[:4])
        await schema.Migrator(conn).migrate()
        writes = [
            {"field": "a", "value": 1, "stamp": [1000, 1, "w1"]},
            {"field": "b", "value": {"deep": [1, None]}, "stamp": [1000, 2, "w1"]},
            {"field": "gone", "value": 1, "stamp": [1000, 3, "w1"]},
            {"field": "gone", "value": {"__deleted": True}, "stamp": [2000, 1, "w2"]},
            {"field": "nothing", "value": None, "stamp": [1000, 4, "w1"]},
        ]
        db.execute(f"SELECT synckit_save_writes('d', '{json.dumps(writes)}')")
        db.execute("""INSERT INTO documents (id, state) VALUES ('ref', '{"id": "ref", "fields": {"r": 1}}')""")
        before = {
            "d": StoredDocument(
                {"a": 1, "b": {"deep": [1, None]}, "nothing": None},
                {"w1": 4, "w2": 1},
                None,
                {"a": (1000, 1, "w1"), "b": (1000, 2, "w1"), "gone": (2000, 1, "w2"), "nothing": (1000, 4, "w1")},
            ),
            "ref": StoredDocument({"r": 1}, {}, None, {}),
        }
        [(state,)] = db.execute("SELECT state FROM documents WHERE id = 'd'")
        self.assertEqual((state["fields"], len(state["stamps"])), (before["d"].fields, 4))

        self.patch(schema, "migrations", lambda: everything)
        self.assertEqual([m.version for m in await schema.Migrator(conn).migrate()], list(range(5, schema.latest() + 1)))
        storage = PostgresStorage(reactor, db.url, pool_size=1)
        await storage.start()
        self.addCleanup(storage.stop)
        self.assertEqual({doc_id: await storage.load(doc_id) for doc_id in ("d", "ref")}, before)
        self.assertEqual(db.execute("SELECT count(*) FROM documents WHERE state ? 'stamps'"), [(0,)])
        self.assertEqual(
            db.execute("SELECT field, value, pending FROM synckit_fields ORDER BY field"),
            [("a", 1, False), ("b", {"deep": [1, None]}, False), ("gone", None, False), ("nothing", None, False)],
        )
        self.assertEqual(db.execute("SELECT value IS NULL FROM synckit_fields WHERE field = 'nothing'"), [(False,)])
        self.assertEqual(await storage.sync_state(), 0)


class SyncTimerTests(SynchronousTestCase):
    """The service's state-sync timer, on a fake reactor."""

    class Storage(MemoryStorage):
        def __init__(self, failures: int = 0) -> None:
            super().__init__()
            self.syncs = 0
            self._failures = failures

        def sync_state(self) -> "Deferred[int]":
            self.syncs += 1
            if self.syncs <= self._failures:
                return fail(StorageUnavailable("PostgreSQL at db is unavailable"))
            return succeed(0)

    def service(self, storage: MemoryStorage, **settings: Any) -> MemoryReactorClock:
        reactor = MemoryReactorClock()
        service = SyncKitService(config(port=0, **settings), reactor, storage, LocalPubSub(LocalBus(reactor)))
        service.startService()
        reactor.run()

        def stop() -> None:
            self.successResultOf(service.stopService())
            self.assertEqual(reactor.getDelayedCalls(), [])

        self.addCleanup(stop)
        return reactor

    def test_runs_every_interval(self) -> None:
        """The state is brought up to date once storage has started, then every state-sync-interval."""
        storage = self.Storage()
        reactor = self.service(storage, state_sync_interval=2)
        self.assertEqual(storage.syncs, 1)
        reactor.pump([1] * 10)
        self.assertEqual(storage.syncs, 6)

    def test_storage_down_postpones_a_sync(self) -> None:
        """A sync storage cannot do is logged and the timer goes on: the next one runs."""
        storage = self.Storage(failures=1)
        reactor = self.service(storage, state_sync_interval=1)
        reactor.advance(1)
        self.assertEqual(storage.syncs, 2)
