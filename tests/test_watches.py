"""Reference-counted pub/sub watches."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from synckit.pubsub.watches import Watches


class RecordingPubSub:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def watch(self, doc_id: str) -> None:
        self.calls.append(("watch", doc_id))

    def unwatch(self, doc_id: str) -> None:
        self.calls.append(("unwatch", doc_id))


class WatchesTests(SynchronousTestCase):
    def test_first_and_last(self) -> None:
        """Only the first watch and the last unwatch of a document reach pub/sub."""
        pubsub = RecordingPubSub()
        watches = Watches(pubsub)
        watches.watch("d")
        watches.watch("d")
        watches.unwatch("d")
        self.assertIn("d", watches)
        watches.unwatch("d")
        self.assertNotIn("d", watches)
        self.assertEqual(pubsub.calls, [("watch", "d"), ("unwatch", "d")])

    def test_unbalanced_unwatch_is_harmless(self) -> None:
        """Unwatching a document nobody watches does nothing."""
        pubsub = RecordingPubSub()
        Watches(pubsub).unwatch("never")
        self.assertEqual(pubsub.calls, [])
