"""
A tracker for work nobody waits on: handler Deferreds Autobahn ignores, publications to other
instances.  Failures are logged, never lost, and shutdown waits for what is still running.
"""

from __future__ import annotations

from typing import Any, Coroutine, Optional

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


def run_now(coroutine: Coroutine[Deferred, Any, Any]) -> Optional[Deferred]:
    """
    Run a coroutine as far as it can go now.

    Returns C{None} if it finished without waiting (raising what it raised), or a Deferred for
    its result if it is waiting on one.  L{Deferred.fromCoroutine} allocates several Deferreds
    per call even when every awaited Deferred has already fired; a message handled entirely from
    memory is the common case on the hot path, and here it costs none.
    """
    try:
        awaited = coroutine.send(None)
    except StopIteration:
        return None
    done: Deferred = Deferred()
    awaited.addBoth(_resume, coroutine, done)
    return done


def _resume(result: Any, coroutine: Coroutine[Deferred, Any, Any], done: Deferred) -> None:
    # The awaited Deferred has fired: a value is read by Deferred.__await__ when resumed, a
    # failure is raised into the coroutine here.  Either way the coroutine has taken the result
    # over, and the awaited Deferred is left holding None.  How an awaited Deferred yields and
    # resumes is not Twisted's interface: tests/test_dependencies.py checks it.
    try:
        if isinstance(result, Failure):
            awaited = result.throwExceptionIntoGenerator(coroutine)  # type: ignore[arg-type]
        else:
            awaited = coroutine.send(None)
    except StopIteration as stop:
        done.callback(stop.value)
    except BaseException:
        done.errback()
    else:
        awaited.addBoth(_resume, coroutine, done)
