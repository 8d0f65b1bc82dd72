"""
The storage contract (L{synckit.storage.interface.IStorage}), run against every implementation:
memory, and PostgreSQL on a real server (tests/services.py).
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from synckit.storage.interface import Cleaned, DocumentWrites, FieldWrite, IStorage, StoredDocument
from synckit.storage.memory import MemoryStorage
from synckit.storage.postgres import PostgresStorage
from synckit.sync.document import MAX_CLOCK_ENTRIES, TOMBSTONE
from tests.services import shared_postgres


def write(field: str, value: Any, writer: str = "w1", counter: int = 1, ts: int = 1000) -> FieldWrite:
    return FieldWrite(field, value, writer, counter, ts)


def save(storage: IStorage, doc_id: str, writes: Sequence[FieldWrite]) -> Deferred:
    """Save field writes to one document."""
    return storage.save([DocumentWrites(doc_id, writes)])


class StorageContract:
    """Mixed into a TestCase whose C{make_storage} returns a started, empty storage."""

    storage: IStorage

    async def make_storage(self) -> IStorage:
        raise NotImplementedError

    async def fresh(self) -> IStorage:
        self.storage = await self.make_storage()
        self.addCleanup(self.storage.stop)  # type: ignore[attr-defined]
        return self.storage

    async def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IStorage, await self.fresh()))  # type: ignore[attr-defined]

    async def test_unknown_document(self) -> None:
        """A document never written loads as None."""
        storage = await self.fresh()
        self.assertIsNone(await storage.load("never"))  # type: ignore[attr-defined]

    async def test_round_trip(self) -> None:
        """Fields, the writers' clock entries and the stamps come back as saved."""
        storage = await self.fresh()
        await save(storage, "d", [write("a", 1, "w1", 1, 1000), write("b", "x", "w2", 4, 1001)])
        stored = await storage.load("d")
        self.assertEqual(  # type: ignore[attr-defined]
            stored,
            StoredDocument(
                {"a": 1, "b": "x"}, {"w1": 1, "w2": 4}, None, {"a": (1000, 1, "w1"), "b": (1001, 4, "w2")}
            ),
        )

    async def test_values_survive_exactly(self) -> None:
        """JSON values of every kind, falsy ones included, unicode and a large one, come back equal."""
        storage = await self.fresh()
        values = {
            "null": None, "false": False, "zero": 0, "empty": "", "float": 1.5, "big": 2**53 - 1,
            "unicode": "héllo ✓ 😀", "nested": {"a": [1, {"b": None}], "c": "d"}, "list": [],
            "large": "x" * 1_000_000,
        }  # fmt: skip
        await save(storage, "d", [write(k, v, counter=i + 1) for i, (k, v) in enumerate(values.items())])
        self.assertEqual((await storage.load("d")).fields, values)  # type: ignore[attr-defined]

    async def test_newer_stamp_wins(self) -> None:
        """A write replaces the stored field only if its stamp is newer, whatever the saving order."""
        storage = await self.fresh()
        await save(storage, "d", [write("f", "new", "w2", 1, 2000)])
        await save(storage, "d", [write("f", "old", "w1", 5, 1000)])
        await save(storage, "d", [write("g", "first", "w1", 6, 3000)])
        await save(storage, "d", [write("g", "tie-broken-by-counter", "w2", 7, 3000)])
        await save(storage, "d", [write("h", "a", "w1", 8, 4000)])
        await save(storage, "d", [write("h", "b", "w2", 8, 4000)])  # same ms and counter: writer id decides
        stored = await storage.load("d")
        self.assertEqual(stored.fields, {"f": "new", "g": "tie-broken-by-counter", "h": "b"})  # type: ignore[attr-defined]
        self.assertEqual(stored.stamps["f"], (2000, 1, "w2"))  # type: ignore[attr-defined]

    async def test_writer_ids_compare_by_code_point(self) -> None:
        """Ties on time and counter go to the writer id that is greater by code point, not by locale."""
        storage = await self.fresh()
        await save(storage, "d", [write("f", "upper", "conn-B", 1, 1000)])
        await save(storage, "d", [write("f", "lower", "conn-a", 1, 1000)])  # 'a' > 'B' by code point
        self.assertEqual((await storage.load("d")).fields, {"f": "lower"})  # type: ignore[attr-defined]

    async def test_delete_keeps_its_stamp(self) -> None:
        """A delete removes the field but keeps its stamp, so an older write cannot bring it back."""
        storage = await self.fresh()
        await save(storage, "d", [write("f", 1, "w1", 1, 1000), write("keep", 2, "w1", 2, 1000)])
        await save(storage, "d", [write("f", TOMBSTONE, "w2", 1, 2000)])
        await save(storage, "d", [write("f", "stale", "w1", 3, 1500)])
        stored = await storage.load("d")
        self.assertEqual(stored.fields, {"keep": 2})  # type: ignore[attr-defined]
        self.assertEqual(stored.stamps["f"], (2000, 1, "w2"))  # type: ignore[attr-defined]
        await save(storage, "d", [write("f", "again", "w1", 4, 2500)])
        self.assertEqual((await storage.load("d")).fields, {"keep": 2, "f": "again"})  # type: ignore[attr-defined]

    async def test_writes_in_one_call_apply_in_order(self) -> None:
        storage = await self.fresh()
        await save(storage, "d", [write("f", 1, "w1", 1, 1000), write("f", 2, "w1", 2, 1001)])
        self.assertEqual((await storage.load("d")).fields, {"f": 2})  # type: ignore[attr-defined]

    async def test_clock_entries_only_grow(self) -> None:
        storage = await self.fresh()
        await save(storage, "d", [write("f", 1, "w1", 5, 1000)])
        await save(storage, "d", [write("g", 1, "w1", 3, 1001)])
        self.assertEqual((await storage.load("d")).clock, {"w1": 5})  # type: ignore[attr-defined]

    async def test_documents_are_separate(self) -> None:
        storage = await self.fresh()
        await save(storage, "room:a", [write("f", 1)])
        await save(storage, "room:b", [write("f", 2)])
        self.assertEqual((await storage.load("room:a")).fields, {"f": 1})  # type: ignore[attr-defined]
        self.assertEqual((await storage.load("room:b")).fields, {"f": 2})  # type: ignore[attr-defined]

    async def test_clear(self) -> None:
        storage = await self.fresh()
        await save(storage, "d", [write("f", 1)])
        await storage.clear()
        self.assertIsNone(await storage.load("d"))  # type: ignore[attr-defined]
        self.assertIsNone(await storage.load("t"))  # type: ignore[attr-defined]

    async def test_long_batch_in_one_call(self) -> None:
        """
        30,000 writes in one save (30 times what one message may carry), some fields written
        several times and some deleted: each field ends with its newest write, as if saved one
        by one.  On PostgreSQL before migration 004 this one call ran for minutes.
        """
        storage = await self.fresh()
        writes = [write(f"f{i % 10_000}", i, "w1", i + 1, 1000 + i) for i in range(30_000)]
        writes += [write(f"f{i}", TOMBSTONE, "w2", i + 1, 50_000) for i in range(0, 10_000, 2)]
        await save(storage, "d", writes)
        stored = await storage.load("d")
        self.assertEqual(stored.fields, {f"f{i}": 20_000 + i for i in range(1, 10_000, 2)})  # type: ignore[attr-defined]
        self.assertEqual(len(stored.stamps), 10_000)  # type: ignore[attr-defined]
        self.assertEqual(stored.clock, {"w1": 30_000, "w2": 9_999})  # type: ignore[attr-defined]

    async def test_equal_stamps_keep_the_first(self) -> None:
        """Of two writes of a field with the same stamp, the first saved stays, in one call or two."""
        storage = await self.fresh()
        await save(storage, "d", [write("f", "first"), write("f", "second"), write("g", "first")])
        await save(storage, "d", [write("g", "second")])
        self.assertEqual((await storage.load("d")).fields, {"f": "first", "g": "first"})  # type: ignore[attr-defined]

    async def test_longest_document_id(self) -> None:
        """A document id of 256 characters, the longest the protocol allows, is stored and read back."""
        storage = await self.fresh()
        await save(storage, "d" * 256, [write("f", 1)])
        self.assertEqual((await storage.load("d" * 256)).fields, {"f": 1})  # type: ignore[attr-defined]

    async def test_loaded_clock_is_bounded(self) -> None:
        """
        However many connections wrote a document, a load gives at most MAX_CLOCK_ENTRIES clock
        entries, the most recently raised among them.
        """
        storage = await self.fresh()
        await save(storage, "d", [write(f"f{i}", i, f"conn-{i}", 1) for i in range(MAX_CLOCK_ENTRIES + 50)])
        await save(storage, "d", [write("g", 1, "conn-0", 2)])
        clock = (await storage.load("d")).clock  # type: ignore[attr-defined]
        self.assertEqual(len(clock), MAX_CLOCK_ENTRIES)  # type: ignore[attr-defined]
        self.assertEqual(clock["conn-0"], 2)  # type: ignore[attr-defined]

    async def test_cleanup_forgets_old_tombstones(self) -> None:
        """
        Cleanup forgets the stamps of fields deleted before the cut-off, and nothing else: newer
        deletes, visible fields and other documents keep theirs.
        """
        storage = await self.fresh()
        await save(storage, "d", [write("old", 1, ts=500), write("new", 1, ts=500), write("live", 1, ts=500)])
        await save(storage, "d", [write("old", TOMBSTONE, counter=2, ts=1000), write("new", TOMBSTONE, counter=3, ts=5000)])
        await save(storage, "e", [write("f", 1, ts=500)])
        cleaned = await storage.cleanup(0, 3.0)
        self.assertEqual(cleaned.documents, 1)  # type: ignore[attr-defined]
        stored = await storage.load("d")
        self.assertEqual(stored.stamps, {"new": (5000, 3, "w1"), "live": (500, 1, "w1")})  # type: ignore[attr-defined]
        self.assertEqual(stored.fields, {"live": 1})  # type: ignore[attr-defined]
        self.assertEqual((await storage.load("e")).stamps, {"f": (500, 1, "w1")})  # type: ignore[attr-defined]
        self.assertEqual(await storage.cleanup(0, 3.0), Cleaned(0, 0))  # type: ignore[attr-defined]

    async def test_sync_state_changes_no_load(self) -> None:
        """
        Bringing the reference-readable copy up to date changes nothing a load gives, before
        or after further writes; a second run has nothing left to do.
        """
        storage = await self.fresh()
        await save(storage, "d", [write("a", 1), write("b", 2, counter=2), write("c", 3, counter=3)])
        await save(storage, "d", [write("b", TOMBSTONE, "w2", 1, 2000)])
        before = await storage.load("d")
        await storage.sync_state()
        self.assertEqual(await storage.load("d"), before)  # type: ignore[attr-defined]
        self.assertEqual(await storage.sync_state(), 0)  # type: ignore[attr-defined]
        await save(storage, "d", [write("b", "back", "w2", 2, 3000)])
        self.assertEqual((await storage.load("d")).fields, {"a": 1, "b": "back", "c": 3})  # type: ignore[attr-defined]

    async def test_ping(self) -> None:
        storage = await self.fresh()
        self.assertGreaterEqual(await storage.ping(), 0)  # type: ignore[attr-defined]


class MemoryStorageTests(StorageContract, TestCase):
    async def make_storage(self) -> IStorage:
        storage = MemoryStorage()
        await storage.start()
        return storage


class PostgresStorageTests(StorageContract, TestCase):
    async def make_storage(self) -> IStorage:
        storage = PostgresStorage(reactor, shared_postgres().new_database(), pool_size=2, auto_migrate=True)
        await storage.start()
        return storage
