"""
The data lifecycle (docs/data-lifecycle.md): the service's retention timer, on a Clock, forgets
old tombstones in storage and in cached documents, and keeps running when storage is down.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from synckit.config import load
from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.service import SyncKitService
from synckit.storage.interface import Cleaned, DocumentWrites, FieldWrite, StorageUnavailable
from synckit.storage.memory import MemoryStorage
from synckit.sync.document import TOMBSTONE
from tests.helpers import config

START = 1_700_000_000
HOUR = 3600


class RecordingStorage(MemoryStorage):
    """Memory storage that records each cleanup's cut-offs, and fails the first C{failures} of them."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__()
        self.cleanups: list[tuple[float, float]] = []
        self._failures = failures

    def cleanup(self, deltas_before: float, tombstones_before: float) -> "Deferred[Cleaned]":
        self.cleanups.append((deltas_before, tombstones_before))
        if len(self.cleanups) <= self._failures:
            return fail(StorageUnavailable("PostgreSQL at db is unavailable"))
        return super().cleanup(deltas_before, tombstones_before)


class RetentionTimerTests(SynchronousTestCase):
    def service(self, storage: MemoryStorage, **settings: Any) -> tuple[SyncKitService, MemoryReactorClock]:
        """The service on a fake reactor whose clock reads START, started; it is stopped at the end."""
        reactor = MemoryReactorClock()
        reactor.advance(START)
        service = SyncKitService(config(port=0, **settings), reactor, storage, LocalPubSub(LocalBus(reactor)))
        service.startService()
        reactor.run()  # MemoryReactor runs the callWhenRunning calls: the service starts

        def stop() -> None:
            self.successResultOf(service.stopService())
            self.assertEqual(reactor.getDelayedCalls(), [])

        self.addCleanup(stop)
        return service, reactor

    def test_old_tombstones_forgotten_on_schedule(self) -> None:
        """
        A delete is remembered, in storage and in the cached document, for tombstone-retention;
        the first cleanup after that forgets it, so that an older write of the field is taken
        again.  Cleanups run at start and then every cleanup-interval, with cut-offs from the
        service's clock.
        """
        storage = RecordingStorage()
        deleted_at = START * 1000
        writes = [FieldWrite("gone", 1, "w1", 1, deleted_at - 1), FieldWrite("gone", TOMBSTONE, "w1", 2, deleted_at)]
        storage.save([DocumentWrites("d", writes)])
        service, reactor = self.service(storage, tombstone_retention=HOUR, cleanup_interval=HOUR // 6)
        doc = self.successResultOf(service.server.engine.open("d"))
        day = 24 * HOUR
        self.assertEqual(storage.cleanups, [(START - 30 * day, START - HOUR)])

        reactor.pump([HOUR // 6] * 6)
        self.assertIn("gone", self.successResultOf(storage.load("d")).stamps)
        reactor.advance(HOUR // 6)
        self.assertEqual(len(storage.cleanups), 8)
        self.assertEqual(storage.cleanups[-1][1], START + HOUR // 6)
        self.assertNotIn("gone", self.successResultOf(storage.load("d")).stamps)
        self.assertTrue(doc.merge("gone", "older than the delete", (deleted_at - 1, 1, "w2")))

    def test_storage_down_postpones_a_cleanup(self) -> None:
        """A cleanup that storage cannot do is logged and the timer goes on: the next one runs."""
        storage = RecordingStorage(failures=1)
        _, reactor = self.service(storage, cleanup_interval=60)
        reactor.advance(60)
        self.assertEqual(len(storage.cleanups), 2)


class SettingsTests(SynchronousTestCase):
    def test_durations(self) -> None:
        """The retention settings take durations (7d, 1h), from the environment like any setting."""
        loaded = load(
            {"cleanup-interval": "15m"}, {"SYNCKIT_DELTAS_RETENTION": "90d", "SYNCKIT_TOMBSTONE_RETENTION": "2d"}
        )
        self.assertEqual(
            (loaded.deltas_retention, loaded.tombstone_retention, loaded.cleanup_interval), (90 * 86400, 2 * 86400, 900)
        )
