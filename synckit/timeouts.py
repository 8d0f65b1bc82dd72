"""
The one way synckit puts a deadline on a call made on a client's behalf (a query, a Redis
command): L{within}.

A caller that gives up must not leave the work running unbounded, so at the deadline the work
is cancelled.  But cancelling does not always end the work at once: PostgreSQL, for one, has to
confirm the cancellation of a query before its connection is usable again, and a query may even
commit in between.  So the caller's answer and the work's end are two things.  The caller gets
its answer at the deadline; the work's own Deferred keeps running, and C{settled}, handed to the
caller with the timeout, fires when it has really ended, so that the caller can find out what
happened instead of guessing.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

_T = TypeVar("_T")
_log = Logger()

#: what a timed-out call raises, made from C{settled}: a Deferred that fires with C{None}, never
#: failing, once the work has really ended
OnTimeout = Callable[["Deferred[None]"], BaseException]


def cancel(work: Deferred[Any]) -> None:
    """
    Cancel C{work}, leaving it to fire when it really ends if its canceller says it cannot end
    it now.  Twisted's contract is that a canceller fires the Deferred or lets it fail with
    C{CancelledError}; txpostgres' raises instead, on purpose, because a cancelled query still
    has to be waited for (and psycopg2 raises when it cannot send the cancellation at all).
    Either way the work goes on, and its Deferred reports how it ends.
    """
    try:
        work.cancel()
    except Exception as e:
        _log.debug("cancelling left the work running: {error!r}", error=e)


def within(
    work: Deferred[_T],
    seconds: float,
    clock: IReactorTime,
    on_timeout: Optional[OnTimeout] = None,
    *,
    cancelling: bool = True,
) -> Deferred[_T]:
    """
    C{work}'s result, or, after C{seconds} on C{clock}, the exception C{on_timeout} makes
    (Twisted's C{TimeoutError} without one).  At the deadline C{work} is cancelled (L{cancel}),
    unless C{cancelling} is false: for work that cannot be cancelled cleanly, such as
    PostgreSQL connection attempts (psycopg2 refuses to cancel one under way), which the caller
    abandons its own way (by closing the connections).

    The Deferred returned is the caller's; C{work} keeps its own result.  Whatever C{work} ends
    with after the deadline is nobody's answer any more and is dropped: C{settled}, the
    Deferred given to C{on_timeout}, fires with C{None} when it ends.  Cancelling the returned
    Deferred cancels C{work} too (if C{cancelling}).
    """
    settled: Deferred[None] = Deferred()
    waiting: Deferred[_T] = Deferred(lambda _: cancel(work)) if cancelling else Deferred()

    def ended(outcome: Any) -> None:
        if not waiting.called:
            if isinstance(outcome, Failure):
                waiting.errback(outcome)
            else:
                waiting.callback(outcome)
        settled.callback(None)

    work.addBoth(ended)
    if on_timeout is None:
        return waiting.addTimeout(seconds, clock)

    def timed_out(result: Any, timeout: float) -> Failure:
        return Failure(on_timeout(settled))

    return waiting.addTimeout(seconds, clock, onTimeoutCancel=timed_out)
