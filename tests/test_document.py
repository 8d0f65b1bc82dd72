"""
One document's last-writer-wins state and vector clock (PROTOCOL.md sections 6.1 to 6.5), with our
deviation from the reference: local writes get a hybrid-logical stamp, so a write processed later
always wins, even inside one millisecond and against a higher counter.  No reactor is involved.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from synckit.sync.document import (
    MAX_COUNTER,
    RESTORED,
    TOMBSTONE,
    Document,
    is_tombstone,
    merge_clock,
)

NOW = 1_700_000_000_000


class WriteTests(SynchronousTestCase):
    def test_set(self) -> None:
        """A write stores the value and returns it as the authoritative value."""
        doc = Document("d")
        value, _ = doc.write("title", "Hello", "conn-1", NOW)
        self.assertEqual(value, "Hello")
        self.assertEqual(doc.fields, {"title": "Hello"})

    def test_overwrite(self) -> None:
        """A second write replaces the value as a whole (no deep merge of objects)."""
        doc = Document("d")
        doc.write("obj", {"a": 1, "b": 2}, "conn-1", NOW)
        value, _ = doc.write("obj", {"c": 3}, "conn-1", NOW + 1)
        self.assertEqual(value, {"c": 3})
        self.assertEqual(doc.fields, {"obj": {"c": 3}})

    def test_null_is_a_value(self) -> None:
        """Writing null keeps the field, with null: it is not a delete (section 6.3)."""
        doc = Document("d", {"a": 1})
        value, _ = doc.write("a", None, "conn-1", NOW)
        self.assertIsNone(value)
        self.assertEqual(doc.fields, {"a": None})

    def test_tombstone_removes_field(self) -> None:
        """A tombstone removes the field from the map and returns TOMBSTONE (section 6.4)."""
        doc = Document("d")
        doc.write("a", 1, "conn-1", NOW)
        doc.write("b", 2, "conn-1", NOW)
        value, _ = doc.write("a", {"__deleted": True}, "conn-1", NOW + 1)
        self.assertEqual(value, TOMBSTONE)
        self.assertEqual(doc.fields, {"b": 2})

    def test_tombstone_with_extra_keys_returns_canonical(self) -> None:
        """A tombstone with extra keys deletes, and what is returned is the plain tombstone."""
        doc = Document("d", {"a": 1})
        value, _ = doc.write("a", {"__deleted": True, "at": 5}, "conn-1", NOW)
        self.assertEqual(value, {"__deleted": True})
        self.assertNotIn("a", doc.fields)

    def test_delete_missing_field(self) -> None:
        """Deleting a field that does not exist returns TOMBSTONE, leaves the map alone and ticks the clock."""
        doc = Document("d", {"other": 1})
        value, _ = doc.write("missing", TOMBSTONE, "conn-1", NOW)
        self.assertEqual(value, TOMBSTONE)
        self.assertEqual(doc.fields, {"other": 1})
        self.assertEqual(doc.clock, {"conn-1": 1})

    def test_recreate_after_delete(self) -> None:
        """A write after a delete brings the field back, even in the same millisecond."""
        doc = Document("d")
        doc.write("a", 1, "conn-1", NOW)
        doc.write("a", TOMBSTONE, "conn-2", NOW)
        value, _ = doc.write("a", 3, "conn-1", NOW)
        self.assertEqual(value, 3)
        self.assertEqual(doc.fields, {"a": 3})

    def test_rapid_delete_recreate_cycles(self) -> None:
        """Alternating deletes and writes of one field always leave the last operation's result."""
        doc = Document("d")
        for i in range(5):
            doc.write("a", i, "conn-1", NOW)
            self.assertEqual(doc.fields, {"a": i})
            doc.write("a", TOMBSTONE, "conn-1", NOW)
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
        """Writing {"__deleted": "true"} stores it as an ordinary value (section 6.4)."""
        doc = Document("d", {"a": 1})
        value, _ = doc.write("a", {"__deleted": "true"}, "conn-1", NOW)
        self.assertEqual(value, {"__deleted": "true"})
        self.assertEqual(doc.fields, {"a": {"__deleted": "true"}})


class VectorClockTests(SynchronousTestCase):
    def test_tick_once_per_field_per_writer(self) -> None:
        """Each field write, set or delete, raises its writer's entry by one; other entries stay (section 6.5)."""
        doc = Document("d", clock={"conn-9": 4})
        doc.write("a", 1, "conn-1", NOW)
        doc.write("b", 2, "conn-1", NOW)
        doc.write("c", TOMBSTONE, "conn-1", NOW)
        doc.write("a", 5, "conn-2", NOW)
        self.assertEqual(doc.clock, {"conn-9": 4, "conn-1": 3, "conn-2": 1})

    def test_stamp_carries_counter_and_writer(self) -> None:
        """A write's stamp is (time, the writer's counter after the write, writer id)."""
        doc = Document("d", clock={"conn-1": 6})
        _, stamp = doc.write("a", 1, "conn-1", NOW)
        self.assertEqual(stamp, (NOW, 7, "conn-1"))

    def test_merge_clock_elementwise_max(self) -> None:
        """Merging takes each entry's maximum; missing entries count as absent, not lowered."""
        into = {"a": 5, "b": 1}
        merge_clock(into, {"a": 3, "b": 4, "c": 2})
        self.assertEqual(into, {"a": 5, "b": 4, "c": 2})

    def test_merge_clock_ignores_bad_entries(self) -> None:
        """Entries that are not non-negative integers (floats, strings, bools, negatives, null) are ignored (R-3)."""
        into = {"a": 1}
        merge_clock(into, {"a": 2.5, "b": "3", "c": -1, "d": True, "e": None, "f": [1], "g": 0, "h": 7})
        self.assertEqual(into, {"a": 1, "g": 0, "h": 7})

    def test_merge_clock_caps_counters(self) -> None:
        """Counters above JavaScript's largest exact integer are ignored; the largest itself is taken."""
        into: dict[str, int] = {}
        merge_clock(into, {"big": MAX_COUNTER + 1, "huge": 2**64, "max": MAX_COUNTER})
        self.assertEqual(into, {"max": 2**53 - 1})

    def test_merge_clock_ignores_non_objects(self) -> None:
        """A clock that is not an object (missing, list, string, number) changes nothing (R-3)."""
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
        doc.write("a", "first", "conn-2", NOW)
        value, _ = doc.write("a", "second", "conn-1", NOW)
        self.assertEqual(value, "second")
        self.assertEqual(doc.fields, {"a": "second"})

    def test_later_write_wins_against_higher_counter(self) -> None:
        """
        A writer with a low counter still wins over an earlier write, in the same millisecond, by
        a writer with a much higher counter (where the reference's tie-break would keep the older).
        """
        doc = Document("d")
        for i in range(10):
            doc.write("other", i, "conn-9", NOW)
        doc.write("a", "high", "conn-9", NOW)
        value, stamp = doc.write("a", "low", "conn-1", NOW)
        self.assertEqual(value, "low")
        self.assertEqual(doc.fields["a"], "low")
        self.assertEqual(stamp[1], 1)

    def test_stamps_strictly_increase(self) -> None:
        """Successive writes of one field inside one millisecond get strictly increasing stamps."""
        doc = Document("d")
        stamps = [doc.write("a", i, f"conn-{5 - i}", NOW)[1] for i in range(5)]
        self.assertEqual(stamps, sorted(stamps))
        self.assertEqual(len(set(stamps)), 5)
        self.assertEqual(doc.fields, {"a": 4})

    def test_stamp_not_earlier_than_now(self) -> None:
        """A write's stamp time is the current millisecond when nothing later is stored."""
        doc = Document("d")
        doc.write("a", 1, "conn-1", NOW)
        _, stamp = doc.write("a", 2, "conn-1", NOW + 50)
        self.assertEqual(stamp[0], NOW + 50)

    def test_restored_fields_lose_to_any_write(self) -> None:
        """Fields loaded from storage carry the lowest stamp: any write, local or remote, replaces them (section 6.8)."""
        doc = Document("d", {"a": "stored", "b": "stored"})
        value, _ = doc.write("a", "new", "conn-1", 0)
        self.assertEqual(value, "new")
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
        _, stamp = doc.write("a", "local", "conn-1", NOW)
        self.assertTrue(doc.merge("a", "remote", (NOW + 1, 1, "conn-1")))
        self.assertEqual(doc.fields, {"a": "remote"})
        self.assertEqual(stamp, (NOW, 1, "conn-1"))

    def test_older_remote_loses(self) -> None:
        """A remote write with an older stamp is refused and the local value stays."""
        doc = Document("d")
        doc.write("a", "local", "conn-1", NOW)
        self.assertFalse(doc.merge("a", "remote", (NOW - 1, 99, "conn-9")))
        self.assertEqual(doc.fields, {"a": "local"})

    def test_same_millisecond_tie_breaks(self) -> None:
        """Inside one millisecond a remote write is ordered by counter, then by writer id."""
        doc = Document("d")
        doc.write("a", "local", "conn-2", NOW)  # (NOW, 1, "conn-2")
        self.assertFalse(doc.merge("a", "lower id", (NOW, 1, "conn-1")))
        self.assertTrue(doc.merge("a", "higher counter", (NOW, 2, "conn-1")))
        self.assertEqual(doc.fields, {"a": "higher counter"})

    def test_equal_stamp_not_applied(self) -> None:
        """A remote write with exactly the stored stamp is not applied again."""
        doc = Document("d")
        _, stamp = doc.write("a", "local", "conn-1", NOW)
        self.assertFalse(doc.merge("a", "other", stamp))
        self.assertEqual(doc.fields, {"a": "local"})

    def test_older_remote_loses_to_retained_delete(self) -> None:
        """A delete keeps its stamp: a delayed older remote write cannot bring the field back."""
        doc = Document("d")
        doc.write("a", 1, "conn-1", NOW)
        doc.write("a", TOMBSTONE, "conn-1", NOW + 10)
        self.assertFalse(doc.merge("a", "stale", (NOW + 5, 50, "conn-7")))
        self.assertEqual(doc.fields, {})

    def test_newer_remote_beats_delete(self) -> None:
        """A remote write newer than a local delete recreates the field."""
        doc = Document("d")
        doc.write("a", TOMBSTONE, "conn-1", NOW)
        self.assertTrue(doc.merge("a", "back", (NOW + 1, 1, "conn-3")))
        self.assertEqual(doc.fields, {"a": "back"})

    def test_remote_tombstone_deletes(self) -> None:
        """A newer remote tombstone removes the field."""
        doc = Document("d")
        doc.write("a", 1, "conn-1", NOW)
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
        value, stamp = doc.write("a", "local", "conn-1", NOW)
        self.assertEqual(value, "local")
        self.assertGreater(stamp, (NOW + 1000, 5, "conn-9"))


class ResetTests(SynchronousTestCase):
    def test_reset(self) -> None:
        """reset() empties fields, stamps, clock, lastModified and text state, keeping the object's id."""
        doc = Document("d", {"a": 1}, {"conn-1": 3}, ("crdt", 1.0))
        doc.write("b", 2, "conn-2", NOW + 5)
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
        doc.write("a", 2, "conn-1", NOW)
        self.assertEqual((fields, clock), ({"a": 1}, {"conn-1": 1}))
