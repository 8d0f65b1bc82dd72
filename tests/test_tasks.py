"""The coroutine driver and the background-task tracker."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from synckit.tasks import BackgroundTasks, run_now


class RunNowTests(SynchronousTestCase):
    def test_finishes_without_a_deferred(self) -> None:
        """A coroutine that only awaits fired Deferreds runs to the end inside the call."""
        seen = []

        async def work() -> None:
            seen.append(await succeed(1))
            seen.append(await succeed(2))

        self.assertIsNone(run_now(work()))
        self.assertEqual(seen, [1, 2])

    def test_raises_synchronously(self) -> None:
        """An exception before any wait reaches the caller directly."""

        async def work() -> None:
            await succeed(None)
            raise ValueError("bad")

        self.assertRaises(ValueError, run_now, work())

    def test_waits_and_resumes(self) -> None:
        """A coroutine that waits returns a Deferred firing with its result, and gets each value."""
        first, second = Deferred(), Deferred()

        async def work() -> int:
            return await first + await second

        done = run_now(work())
        self.assertIsNotNone(done)
        self.assertNoResult(done)
        first.callback(2)
        self.assertNoResult(done)
        second.callback(3)
        self.assertEqual(self.successResultOf(done), 5)

    def test_failure_after_waiting(self) -> None:
        """A failure of an awaited Deferred is raised in the coroutine, and can be caught there."""
        awaited = Deferred()

        async def work() -> str:
            try:
                await awaited
            except KeyError:
                return "caught"
            return "not raised"

        done = run_now(work())
        awaited.errback(KeyError("x"))
        self.assertEqual(self.successResultOf(done), "caught")

    def test_uncaught_failure_fails_the_result(self) -> None:
        """An exception after waiting fails the returned Deferred."""
        awaited = Deferred()

        async def work() -> None:
            await awaited
            raise ValueError("late")

        done = run_now(work())
        awaited.callback(None)
        self.failureResultOf(done, ValueError)


class BackgroundTasksTests(SynchronousTestCase):
    def test_wait_covers_running_tasks(self) -> None:
        """wait() fires only once every task running when it was called has finished."""
        tasks = BackgroundTasks()
        running = Deferred()
        tasks.add(running)
        self.assertEqual(len(tasks), 1)
        waited = tasks.wait()
        self.assertNoResult(waited)
        running.callback(None)
        self.successResultOf(waited)
        self.assertEqual(len(tasks), 0)

    def test_failures_are_logged_not_lost(self) -> None:
        """A failing task is logged as a failure and does not fail wait()."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tasks = BackgroundTasks()
        failing = Deferred()
        tasks.add(failing, "sending")
        failing.errback(RuntimeError("boom"))
        self.successResultOf(tasks.wait())
        logged = [e for e in events if "log_failure" in e]
        self.assertEqual(len(logged), 1)
        self.assertEqual(logged[0]["what"], "sending")
        self.flushLoggedErrors(RuntimeError)
