"""
Group commit under failure: the writes that arrive while storage is busy are saved together;
no caller is answered before its writes are durable; a failed group fails exactly its own
writes; a refused group is split so that only the culprit fails.  Storage is a recording fake
whose saves wait for the test.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from synckit.storage.group import GroupCommit, combined
from synckit.storage.interface import DocumentWrites, FieldWrite, StorageRefused, StorageUnavailable
from synckit.sync.document import Text
from synckit.sync.fugue import FugueText
from tests.helpers import text_state


class HeldStorage:
    """Every save waits; C{saves} holds (writes, Deferred) in the order they reached storage."""

    def __init__(self) -> None:
        self.saves: list[tuple[Sequence[DocumentWrites], Deferred]] = []

    def save(self, writes: Sequence[DocumentWrites]) -> Deferred:
        d: Deferred = Deferred()
        self.saves.append((list(writes), d))
        return d


def field(doc_id: str, name: str, value: Any, writer: str = "w", counter: int = 1) -> list[DocumentWrites]:
    return [DocumentWrites(doc_id, [FieldWrite(name, value, writer, counter, 1000)])]


def text(doc_id: str, client: str, typed: str) -> list[DocumentWrites]:
    return [DocumentWrites(doc_id, text=Text(FugueText.parse(text_state(client, typed)), 1))]


class GroupCommitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.storage = HeldStorage()
        self.group = GroupCommit(self.storage, concurrency=1)  # type: ignore[arg-type]

    def test_idle_save_goes_at_once(self) -> None:
        """With nothing in flight a save reaches storage at once, alone, and waits for it."""
        d = self.group.save(field("a", "f", 1))
        self.assertEqual([w for w, _ in self.storage.saves], [field("a", "f", 1)])
        self.assertNoResult(d)
        self.storage.saves[0][1].callback({})
        self.assertEqual(self.successResultOf(d), {})

    def test_writes_arriving_meanwhile_go_together(self) -> None:
        """
        While a save is in flight, later writes queue; when it ends they reach storage as one
        save, one entry per document, field writes in arrival order.
        """
        first = self.group.save(field("a", "f", 1))
        queued = [self.group.save(field("a", "f", 2, "x")), self.group.save(field("b", "g", 3)), self.group.save(field("a", "h", 4, "y"))]
        self.assertEqual(len(self.storage.saves), 1)
        self.storage.saves[0][1].callback({})
        self.successResultOf(first)
        [(writes, _)] = self.storage.saves[1:]
        self.assertEqual([d.doc_id for d in writes], ["a", "b"])
        self.assertEqual([(w.field, w.value) for w in writes[0].fields], [("f", 2), ("h", 4)])
        for d in queued:
            self.assertNoResult(d)

    def test_no_answer_before_durable(self) -> None:
        """A queued write is answered only when its own group is durable, not when an earlier one is."""
        self.group.save(field("a", "f", 1))
        queued = self.group.save(field("a", "f", 2))
        self.storage.saves[0][1].callback({})
        self.assertNoResult(queued)
        self.storage.saves[1][1].callback({})
        self.assertEqual(self.successResultOf(queued), {})

    def test_failed_group_fails_exactly_its_writes(self) -> None:
        """
        A group that fails (storage down) fails its own callers, and neither the save before it
        nor the writes queued after it.
        """
        first = self.group.save(field("a", "f", 1))
        in_group = [self.group.save(field("a", "f", 2)), self.group.save(field("b", "g", 3))]
        self.storage.saves[0][1].callback({})
        after = self.group.save(field("c", "h", 4))
        self.storage.saves[1][1].errback(StorageUnavailable("down"))
        self.successResultOf(first)
        for d in in_group:
            self.failureResultOf(d, StorageUnavailable)
        self.assertNoResult(after)
        self.storage.saves[2][1].callback({})
        self.successResultOf(after)

    def test_refused_group_is_split_to_find_the_culprit(self) -> None:
        """
        When storage refuses a group's data, each of its callers is saved again on its own,
        ahead of newer writes: only the one whose data is refused fails.
        """
        self.group.save(field("a", "f", 1)).addErrback(lambda f: None)
        good = self.group.save(field("a", "f", "fine"))
        bad = self.group.save(field("b", "g", "nul\u0000"))
        self.storage.saves[0][1].callback({})
        newer = self.group.save(field("c", "h", 5))
        self.storage.saves[1][1].errback(StorageRefused("JSONB refuses \\u0000"))
        alone_good = self.storage.saves[2]
        self.assertEqual(alone_good[0], field("a", "f", "fine"))
        alone_good[1].callback({})
        self.successResultOf(good)
        alone_bad = self.storage.saves[3]
        self.assertEqual(alone_bad[0], field("b", "g", "nul\u0000"))
        alone_bad[1].errback(StorageRefused("JSONB refuses \\u0000"))
        self.failureResultOf(bad, StorageRefused)
        self.assertEqual(self.storage.saves[4][0], field("c", "h", 5))
        self.assertNoResult(newer)

    def test_each_caller_gets_its_own_documents_text(self) -> None:
        """A group's stored text goes to the callers that wrote to those documents."""
        self.group.save(field("x", "f", 1))
        on_a = self.group.save(text("a", "alice", "Hi"))
        on_b = self.group.save(field("b", "g", 1))
        self.storage.saves[0][1].callback({})
        stored = Text(FugueText.parse(text_state("alice", "Hi")), 1)
        self.storage.saves[1][1].callback({"a": stored})
        self.assertEqual(self.successResultOf(on_a), {"a": stored})
        self.assertEqual(self.successResultOf(on_b), {})

    def test_concurrency_allows_that_many_in_flight(self) -> None:
        """With concurrency 2, two saves are in flight before writes queue."""
        group = GroupCommit(self.storage, concurrency=2)  # type: ignore[arg-type]
        group.save(field("a", "f", 1))
        group.save(field("b", "f", 1))
        group.save(field("c", "f", 1))
        self.assertEqual(len(self.storage.saves), 2)


class CombinedTests(SynchronousTestCase):
    def test_texts_of_one_document_merged_into_a_copy(self) -> None:
        """Two callers' text for one document become one merged state; neither caller's changes."""
        one, two = text("a", "alice", "Hello"), text("a", "bob", "World")
        before = (one[0].text.state.to_json(), two[0].text.state.to_json())
        [doc] = combined([one, two])
        self.assertEqual(sorted(doc.text.state.text()), sorted("HelloWorld"))
        self.assertEqual((one[0].text.state.to_json(), two[0].text.state.to_json()), before)

    def test_one_caller_unchanged(self) -> None:
        """A group of one is saved as it came."""
        writes = field("a", "f", 1)
        self.assertEqual(combined([writes]), writes)
