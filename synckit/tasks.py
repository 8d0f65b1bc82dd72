"""
A tracker for work nobody waits on: handler Deferreds Autobahn ignores, publications to other
instances.  Failures are logged, never lost, and shutdown waits for what is still running.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure


class BackgroundTasks:
    _log = Logger()

    def __init__(self) -> None:
        self._running: set[Deferred] = set()

    def add(self, d: Deferred, what: str = "background task") -> None:
        if d.called:
            d.addErrback(self._failed, what)
            return
        self._running.add(d)
        d.addErrback(self._failed, what)
        d.addBoth(self._done, d)

    def _failed(self, failure: Failure, what: str) -> None:
        self._log.failure("{what} failed", failure, what=what)

    def _done(self, result: Any, d: Deferred) -> Any:
        self._running.discard(d)
        return result

    def __len__(self) -> int:
        return len(self._running)

    def wait(self) -> Deferred:
        """Fires when everything running now has finished."""
        return DeferredList(list(self._running))
