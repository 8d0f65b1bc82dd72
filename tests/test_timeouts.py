"""
The one timeout helper (L{synckit.timeouts.within}) on a Clock, and once on a real PostgreSQL
query, whose cancellation has to be confirmed by the server before the query has ended.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from txpostgres import txpostgres

from synckit.timeouts import cancel, within
from tests.services import shared_postgres


class Late(Exception):
    def __init__(self, settled: Deferred) -> None:
        super().__init__("late")
        self.settled = settled


class Unstoppable:
    """A canceller that cannot end the work at once, as txpostgres' cannot: it raises."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self, d: Deferred) -> None:
        self.asked += 1
        raise RuntimeError("cancellation under way")


class WithinTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    def test_result_in_time(self) -> None:
        """A result before the deadline is the caller's, and the timer is gone."""
        work: Deferred[int] = Deferred()
        d = within(work, 5, self.clock, Late)
        self.clock.advance(4)
        work.callback(7)
        self.assertEqual(self.successResultOf(d), 7)

    def test_failure_in_time(self) -> None:
        """A failure before the deadline is the caller's as it is."""
        work: Deferred[int] = Deferred()
        d = within(work, 5, self.clock, Late)
        work.errback(ValueError("no"))
        self.failureResultOf(d, ValueError)

    def test_work_ended_by_cancelling(self) -> None:
        """
        At the deadline the work is cancelled; work that ends at once (a Deferred without a
        canceller) has settled by the time the caller gets the timeout.
        """
        work: Deferred[int] = Deferred()
        d = within(work, 5, self.clock, Late)
        self.clock.advance(5)
        late = self.failureResultOf(d, Late).value
        self.assertTrue(work.called)
        self.assertIsNone(self.successResultOf(late.settled))

    def test_work_that_outlives_the_deadline(self) -> None:
        """
        Work whose cancellation takes time (a query the server has yet to confirm cancelled):
        the caller gets the timeout at the deadline, C{settled} fires only when the work really
        ends, and what it ends with is dropped, not left unhandled.
        """
        for outcome in (3, ValueError("failed late")):
            canceller = Unstoppable()
            work: Deferred[int] = Deferred(canceller)
            d = within(work, 5, self.clock, Late)
            self.clock.advance(5)
            late = self.failureResultOf(d, Late).value
            self.assertEqual(canceller.asked, 1)
            self.assertNoResult(late.settled)
            if isinstance(outcome, Exception):
                work.errback(outcome)
            else:
                work.callback(outcome)
            self.assertIsNone(self.successResultOf(late.settled))
            self.assertIsNone(self.successResultOf(work))

    def test_default_is_twisteds_timeout_error(self) -> None:
        """Without C{on_timeout}, the caller gets Twisted's C{TimeoutError}."""
        d = within(Deferred(), 1, self.clock)
        self.clock.advance(1)
        self.failureResultOf(d, TimeoutError)

    def test_caller_cancelling_cancels_the_work(self) -> None:
        """Cancelling the caller's Deferred cancels the work, whose canceller may not end it."""
        plain: Deferred[int] = Deferred()
        d = within(plain, 5, self.clock, Late)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(plain.called)
        canceller = Unstoppable()
        d = within(Deferred(canceller), 5, self.clock, Late)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(canceller.asked, 1)

    def test_not_cancelling(self) -> None:
        """
        With C{cancelling} false the work is left alone at the deadline: the caller has its
        timeout, and C{settled} fires when the work ends by itself.
        """
        canceller = Unstoppable()
        work: Deferred[int] = Deferred(canceller)
        d = within(work, 5, self.clock, Late, cancelling=False)
        self.clock.advance(5)
        late = self.failureResultOf(d, Late).value
        self.assertEqual(canceller.asked, 0)
        self.assertNoResult(late.settled)
        work.callback(1)
        self.assertIsNone(self.successResultOf(late.settled))

    def test_cancel_leaves_work_that_cannot_stop(self) -> None:
        """L{cancel} asks; a canceller that raises leaves the work running, to fire later."""
        work: Deferred[int] = Deferred(Unstoppable())
        cancel(work)
        self.assertNoResult(work)
        work.callback(1)
        self.assertEqual(self.successResultOf(work), 1)


class PostgresQueryTests(TestCase):
    """What synckit's storage needs of L{within}, on a real server."""

    async def test_timed_out_query_is_cancelled_and_settles(self) -> None:
        """
        A query over the deadline: the caller has its timeout at the deadline, PostgreSQL is
        asked to cancel the query, C{settled} fires once it has, and the connection then runs
        the next query.
        """
        connection = txpostgres.Connection(reactor)
        await connection.connect(shared_postgres().url)
        self.addCleanup(connection.close)
        started = reactor.seconds()
        with self.assertRaises(Late) as caught:
            await within(connection.runQuery("SELECT pg_sleep(30)"), 0.2, reactor, Late)
        self.assertLess(reactor.seconds() - started, 5)
        await caught.exception.settled
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual(await connection.runQuery("SELECT 1"), [(1,)])
        # txpostgres reports outcomes a reactor turn late: let them land before the cleanup.
        await deferLater(reactor, 0, lambda: None)
