"""
One document's last-writer-wins state and vector clock, with our deviation from the reference:
local writes get a hybrid-logical stamp, so a write processed later always wins, even inside one
millisecond and against a higher counter.  No reactor is involved.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from synckit.sync.document import (
    MAX_CLOCK_ENTRIES,
    MAX_CLOCK_KEY,
    MAX_COUNTER,
    RESTORED,
    SERVER_CLOCK,
    TOMBSTONE,
    Document,
    Stamp,
    is_tombstone,
    merge_clock,
)

NOW = 1_700_000_000_000


def write(doc: Document, field: str, value: Any, writer: str, now: int) -> Stamp:
    """A local write as the engine makes it once storage confirmed it: stamp, merge, tick the clock."""
    counter = doc.clock.get(writer, 0) + 1
    stamp = doc.stamp(field, writer, counter, now)
    doc.merge(field, value, stamp)
    doc.settle(field, stamp)
    doc.clock[writer] = counter
    return stamp


class WriteTests(SynchronousTestCase):
    def test_set(self) -> None:
        """A write stores the value."""
        doc = Document("d")
        write(doc, "title", "Hello", "conn-1", NOW)
        self.assertEqual(doc.fields, {"title": "Hello"})

    def test_overwrite(self) -> None:
        """A second write replaces the value as a whole (no deep merge of objects)."""
        doc = Document("d")
        write(doc, "obj", {"a": 1, "b": 2}, "conn-1", NOW)
        write(doc, "obj", {"c": 3}, "conn-1", NOW + 1)
        self.assertEqual(doc.fields, {"obj": {"c": 3}})

    def test_null_is_a_value(self) -> None:
        """Writing null keeps the field, with null: it is not a delete ."""
        doc = Document("d", {"a": 1})
        write(doc, "a", None, "conn-1", NOW)
        self.assertEqual(doc.fields, {"a": None})

    def test_tombstone_removes_field(self) -> None:
        """A tombstone removes the field from the map."""
        doc = Document("d")
        write(doc, "a", 1, "conn-1", NOW)
        write(doc, "b", 2, "conn-1", NOW)
        write(doc, "a", {"__deleted": True}, "conn-1", NOW + 1)
        self.assertEqual(doc.fields, {"b": 2})

    def test_tombstone_with_extra_keys_returns_canonical(self) -> None:
        """A tombstone with extra keys deletes too."""
        doc = Document("d", {"a": 1})
        write(doc, "a", {"__deleted": True, "at": 5}, "conn-1", NOW)
        self.assertNotIn("a", doc.fields)

    def test_delete_missing_field(self) -> None:
        """Deleting a field that does not exist leaves the map alone and ticks the clock."""
        doc = Document("d", {"other": 1})
        write(doc, "missing", TOMBSTONE, "conn-1", NOW)
        self.assertEqual(doc.fields, {"other": 1})
        self.assertEqual(doc.clock, {"conn-1": 1})

    def test_recreate_after_delete(self) -> None:
        """A write after a delete brings the field back, even in the same millisecond."""
        doc = Document("d")
        write(doc, "a", 1, "conn-1", NOW)
        write(doc, "a", TOMBSTONE, "conn-2", NOW)
        write(doc, "a", 3, "conn-1", NOW)
        self.assertEqual(doc.fields, {"a": 3})

    def test_rapid_delete_recreate_cycles(self) -> None:
        """Alternating deletes and writes of one field always leave the last operation's result."""
        doc = Document("d")
        for i in range(5):
            write(doc, "a", i, "conn-1", NOW)
            self.assertEqual(doc.fields, {"a": i})
            write(doc, "a", TOMBSTONE, "conn-1", NOW)
            self.assertEqual(doc.fields, {})


class TombstoneDetectionTests(SynchronousTestCase):
    def test_exact_true_only(self) -> None:
        """Only an object whose __deleted is exactly true is a tombstone; extra keys are fine."""
        self.assertTrue(is_tombstone({"__deleted": True}))
        self.assertTrue(is_tombstone({"__deleted": True, "extra": [1, 2]}))
        for value in (
            {"__deleted": "true"},
            {"__deleted": 1},
            {"__deleted": False},
            {"__deleted": None},
            {},
            None,
            "__deleted",
            [{"__deleted": True}],
            True,
        ):
            self.assertFalse(is_tombstone(value), value)

    def test_string_true_is_a_value(self) -> None:
        """Writing {"__deleted": "true"} stores it as an ordinary value."""
        doc = Document("d", {"a": 1})
        write(doc, "a", {"__deleted": "true"}, "conn-1", NOW)
        self.assertEqual(doc.fields, {"a": {"__deleted": "true"}})


class VectorClockTests(SynchronousTestCase):
    def test_tick_once_per_field_per_writer(self) -> None:
        """Each field write, set or delete, raises its writer's entry by one; other entries stay."""
        doc = Document("d", clock={"conn-9": 4})
        write(doc, "a", 1, "conn-1", NOW)
        write(doc, "b", 2, "conn-1", NOW)
        write(doc, "c", TOMBSTONE, "conn-1", NOW)
        write(doc, "a", 5, "conn-2", NOW)
        self.assertEqual(doc.clock, {"conn-9": 4, "conn-1": 3, "conn-2": 1})

    def test_stamp_carries_counter_and_writer(self) -> None:
        """A write's stamp is (time, the writer's counter after the write, writer id)."""
        doc = Document("d", clock={"conn-1": 6})
        stamp = write(doc, "a", 1, "conn-1", NOW)
        self.assertEqual(stamp, (NOW, 7, "conn-1"))

    def test_merge_clock_elementwise_max(self) -> None:
        """Merging takes each entry's maximum; missing entries count as absent, not lowered."""
        into = {"a": 5, "b": 1}
        merge_clock(into, {"a": 3, "b": 4, "c": 2})
        self.assertEqual(into, {"a": 5, "b": 4, "c": 2})

    def test_merge_clock_ignores_bad_entries(self) -> None:
        """Entries that are not non-negative integers (floats, strings, bools, negatives, null) are ignored."""
        into = {"a": 1}
        merge_clock(into, {"a": 2.5, "b": "3", "c": -1, "d": True, "e": None, "f": [1], "g": 0, "h": 7})
        self.assertEqual(into, {"a": 1, "g": 0, "h": 7})

    def test_merge_clock_caps_counters(self) -> None:
        """Counters above JavaScript's largest exact integer are ignored; the largest itself is taken."""
        into: dict[str, int] = {}
        merge_clock(into, {"big": MAX_COUNTER + 1, "huge": 2**64, "max": MAX_COUNTER})
        self.assertEqual(into, {"max": 2**53 - 1})

    def test_merge_clock_ignores_non_objects(self) -> None:
        """A clock that is not an object (missing, list, string, number) changes nothing."""
        into = {"a": 1}
        for other in (None, [["a", 9]], "a", 9, True):
            merge_clock(into, other)
        self.assertEqual(into, {"a": 1})

    def test_document_merge_clock(self) -> None:
        """Document.merge_clock merges into the document's own clock."""
        doc = Document("d", clock={"conn-1": 2})
        doc.merge_clock({"conn-1": 1, "sdk-client": 9})
        self.assertEqual(doc.clock, {"conn-1": 2, "sdk-client": 9})


class LastWriterWinsTests(SynchronousTestCase):
    def test_later_write_wins_same_millisecond(self) -> None:
        """Two writes processed in the same millisecond: the one processed second wins."""
        doc = Document("d")
        write(doc, "a", "first", "conn-2", NOW)
        write(doc, "a", "second", "conn-1", NOW)
        self.assertEqual(doc.fields, {"a": "second"})

    def test_later_write_wins_against_higher_counter(self) -> None:
        """
        A writer with a low counter still wins over an earlier write, in the same millisecond, by
        a writer with a much higher counter (where the reference's tie-break would keep the older).
        """
        doc = Document("d")
        for i in range(10):
            write(doc, "other", i, "conn-9", NOW)
        write(doc, "a", "high", "conn-9", NOW)
        stamp = write(doc, "a", "low", "conn-1", NOW)
        self.assertEqual(doc.fields["a"], "low")
        self.assertEqual(stamp[1], 1)

    def test_stamps_strictly_increase(self) -> None:
        """Successive writes of one field inside one millisecond get strictly increasing stamps."""
        doc = Document("d")
        stamps = [write(doc, "a", i, f"conn-{5 - i}", NOW) for i in range(5)]
        self.assertEqual(stamps, sorted(stamps))
        self.assertEqual(len(set(stamps)), 5)
        self.assertEqual(doc.fields, {"a": 4})

    def test_stamp_not_earlier_than_now(self) -> None:
        """A write's stamp time is the current millisecond when nothing later is stored."""
        doc = Document("d")
        write(doc, "a", 1, "conn-1", NOW)
        stamp = write(doc, "a", 2, "conn-1", NOW + 50)
        self.assertEqual(stamp[0], NOW + 50)

    def test_restored_fields_lose_to_any_write(self) -> None:
        """Fields loaded from storage carry the lowest stamp: any write, local or remote, replaces them."""
        doc = Document("d", {"a": "stored", "b": "stored"})
        write(doc, "a", "new", "conn-1", 0)
        self.assertTrue(doc.merge("b", "remote", (1, 1, "conn-1")))
        self.assertEqual(doc.fields, {"a": "new", "b": "remote"})

    def test_restored_stamp_value(self) -> None:
        """RESTORED is (0, 0, "storage"), so it sorts below every stamp with a positive time."""
        self.assertEqual(RESTORED, (0, 0, "storage"))
        self.assertLess(RESTORED, (1, 0, ""))


class RemoteMergeTests(SynchronousTestCase):
    def test_newer_remote_wins(self) -> None:
        """A remote write with a newer stamp replaces the local value."""
        doc = Document("d")
        stamp = write(doc, "a", "local", "conn-1", NOW)
        self.assertTrue(doc.merge("a", "remote", (NOW + 1, 1, "conn-1")))
        self.assertEqual(doc.fields, {"a": "remote"})
        self.assertEqual(stamp, (NOW, 1, "conn-1"))

    def test_older_remote_loses(self) -> None:
        """A remote write with an older stamp is refused and the local value stays."""
        doc = Document("d")
        write(doc, "a", "local", "conn-1", NOW)
        self.assertFalse(doc.merge("a", "remote", (NOW - 1, 99, "conn-9")))
        self.assertEqual(doc.fields, {"a": "local"})

    def test_same_millisecond_tie_breaks(self) -> None:
        """Inside one millisecond a remote write is ordered by counter, then by writer id."""
        doc = Document("d")
        write(doc, "a", "local", "conn-2", NOW)  # (NOW, 1, "conn-2")
        self.assertFalse(doc.merge("a", "lower id", (NOW, 1, "conn-1")))
        self.assertTrue(doc.merge("a", "higher counter", (NOW, 2, "conn-1")))
        self.assertEqual(doc.fields, {"a": "higher counter"})

    def test_equal_stamp_not_applied(self) -> None:
        """A remote write with exactly the stored stamp is not applied again."""
        doc = Document("d")
        stamp = write(doc, "a", "local", "conn-1", NOW)
        self.assertFalse(doc.merge("a", "other", stamp))
        self.assertEqual(doc.fields, {"a": "local"})

    def test_older_remote_loses_to_retained_delete(self) -> None:
        """A delete keeps its stamp: a delayed older remote write cannot bring the field back."""
        doc = Document("d")
        write(doc, "a", 1, "conn-1", NOW)
        write(doc, "a", TOMBSTONE, "conn-1", NOW + 10)
        self.assertFalse(doc.merge("a", "stale", (NOW + 5, 50, "conn-7")))
        self.assertEqual(doc.fields, {})

    def test_newer_remote_beats_delete(self) -> None:
        """A remote write newer than a local delete recreates the field."""
        doc = Document("d")
        write(doc, "a", TOMBSTONE, "conn-1", NOW)
        self.assertTrue(doc.merge("a", "back", (NOW + 1, 1, "conn-3")))
        self.assertEqual(doc.fields, {"a": "back"})

    def test_remote_tombstone_deletes(self) -> None:
        """A newer remote tombstone removes the field."""
        doc = Document("d")
        write(doc, "a", 1, "conn-1", NOW)
        self.assertTrue(doc.merge("a", TOMBSTONE, (NOW + 1, 1, "conn-2")))
        self.assertEqual(doc.fields, {})

    def test_merge_does_not_tick_clock(self) -> None:
        """Merging a remote write leaves the clock alone: the publisher's clock is merged separately."""
        doc = Document("d")
        doc.merge("a", 1, (NOW, 3, "conn-1"))
        self.assertEqual(doc.clock, {})

    def test_local_write_after_remote_future_stamp_wins(self) -> None:
        """A local write processed after a remote one wins, even if the remote stamp is ahead of our clock."""
        doc = Document("d")
        doc.merge("a", "remote", (NOW + 1000, 5, "conn-9"))
        stamp = write(doc, "a", "local", "conn-1", NOW)
        self.assertGreater(stamp, (NOW + 1000, 5, "conn-9"))


class ResetTests(SynchronousTestCase):
    def test_reset(self) -> None:
        """reset() empties fields, stamps, clock, lastModified and text state, keeping the object's id."""
        doc = Document("d", {"a": 1}, {"conn-1": 3})
        write(doc, "b", 2, "conn-2", NOW + 5)
        doc.last_modified = 123
        doc.reset()
        self.assertEqual((doc.id, doc.fields, doc.clock, doc.last_modified, doc.text), ("d", {}, {}, None, None))
        # The stamps went too: an old remote write now applies.
        self.assertTrue(doc.merge("b", "old", (1, 1, "conn-1")))
        self.assertEqual(doc.fields, {"b": "old"})

    def test_constructor_copies(self) -> None:
        """A document copies the fields and clock it is built from, so storage's copies stay untouched."""
        fields, clock = {"a": 1}, {"conn-1": 1}
        doc = Document("d", fields, clock)
        write(doc, "a", 2, "conn-1", NOW)
        self.assertEqual((fields, clock), ({"a": 1}, {"conn-1": 1}))


class PromisedStampTests(SynchronousTestCase):
    def test_stamp_changes_nothing_visible(self) -> None:
        """Giving a write its stamp shows nothing: the value, its stamp and the clock are as before."""
        doc = Document("d", {"a": 1})
        doc.stamp("a", "conn-1", 1, NOW)
        self.assertEqual((doc.fields, doc.clock), ({"a": 1}, {}))
        self.assertTrue(doc.merge("a", "older but confirmed", (1, 1, "conn-9")))

    def test_promised_stamp_is_outbid(self) -> None:
        """
        A write stamped while another is still being saved gets a later stamp, so it wins
        whichever of the two is saved first.
        """
        doc = Document("d")
        first = doc.stamp("a", "conn-1", 1, NOW)
        second = doc.stamp("a", "conn-2", 1, NOW)
        self.assertGreater(second, first)
        doc.merge("a", "second", second)
        doc.merge("a", "first", first)
        self.assertEqual(doc.fields, {"a": "second"})

    def test_settled_promise_is_forgotten(self) -> None:
        """Once settled, a promised stamp no longer raises the next one (it does not pile up)."""
        doc = Document("d")
        stamp = doc.stamp("a", "conn-1", 1, NOW + 100)
        doc.settle("a", stamp)
        self.assertEqual(doc.stamp("a", "conn-1", 1, NOW), (NOW, 1, "conn-1"))


class ServedClockTests(SynchronousTestCase):
    def test_largest_entry_grows_with_every_serving(self) -> None:
        """
        Each served clock's largest entry is larger than any before it: at least the current
        time in ms, and one more than every entry (clients stamp the values they receive with it).
        """
        doc = Document("d", clock={"conn-1": 3})
        first = max(doc.served_clock(NOW).values())
        second = max(doc.served_clock(NOW).values())
        self.assertEqual((first, second), (NOW, NOW + 1))
        doc.merge_clock({"elsewhere": NOW + 50})
        self.assertEqual(max(doc.served_clock(NOW).values()), NOW + 51)
        self.assertEqual(doc.clock["conn-1"], 3)

    def test_capped_at_the_largest_exact_integer(self) -> None:
        """The entry never passes what JavaScript clients can represent."""
        doc = Document("d", clock={"c": MAX_COUNTER})
        self.assertEqual(doc.served_clock(NOW)[SERVER_CLOCK], MAX_COUNTER)


class ClockBoundTests(SynchronousTestCase):
    """A document's clock grows by merges only up to a bound; writers' own entries are kept."""

    def test_new_entries_stop_at_the_bound(self) -> None:
        """
        A 50,000-entry clock merged in (a client's, another instance's) adds entries only up to
        MAX_CLOCK_ENTRIES, so that no client can make every later message about the document huge.
        """
        doc = Document("d", clock={"conn-1@a": 3})
        self.assertTrue(doc.merge_clock({f"x{i}": i for i in range(50_000)}))
        self.assertEqual(len(doc.clock), MAX_CLOCK_ENTRIES)
        self.assertEqual(doc.clock["conn-1@a"], 3)
        self.assertFalse(doc.merge_clock({"late": 1}))
        self.assertNotIn("late", doc.clock)

    def test_entries_it_has_still_grow(self) -> None:
        """At the bound, entries the clock already has are still raised, and its writers' entries kept."""
        doc = Document("d", clock={f"x{i}": 0 for i in range(MAX_CLOCK_ENTRIES)})
        self.assertTrue(doc.merge_clock({"x7": 9, "new": 1}))
        self.assertEqual((doc.clock["x7"], len(doc.clock)), (9, MAX_CLOCK_ENTRIES))
        write(doc, "f", 1, "conn-2@a", NOW)
        self.assertEqual(doc.clock["conn-2@a"], 1)

    def test_long_keys_ignored(self) -> None:
        """Each entry costs at most MAX_CLOCK_KEY characters of its key: longer keys are not merged."""
        into: dict[str, int] = {}
        merge_clock(into, {"k" * (MAX_CLOCK_KEY + 1): 1, "k" * MAX_CLOCK_KEY: 2})
        self.assertEqual(into, {"k" * MAX_CLOCK_KEY: 2})


class TombstoneCollectionTests(SynchronousTestCase):
    def test_old_tombstones_are_forgotten(self) -> None:
        """
        collect_tombstones forgets deletes stamped before the cut-off and nothing else: newer
        deletes still beat older writes, and visible fields keep their stamps.
        """
        doc = Document("d")
        write(doc, "gone", 1, "conn-1", NOW)
        write(doc, "gone", TOMBSTONE, "conn-1", NOW + 1)
        write(doc, "recent", 1, "conn-1", NOW + 2)
        write(doc, "recent", TOMBSTONE, "conn-1", NOW + 5000)
        write(doc, "kept", 1, "conn-1", NOW)
        self.assertEqual(doc.collect_tombstones(NOW + 1000), 1)
        self.assertFalse(doc.merge("recent", "stale", (NOW + 10, 1, "conn-9")))
        self.assertTrue(doc.merge("gone", "stale", (NOW + 10, 1, "conn-9")))
        self.assertFalse(doc.merge("kept", "stale", (1, 1, "conn-9")))
        self.assertEqual(doc.fields, {"kept": 1, "gone": "stale"})
