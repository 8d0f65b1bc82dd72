"""The twistd plugin and makeService: what an operator sees from the command line."""

from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import time

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from synckit import __version__
from synckit.config import SETTINGS
from synckit.service import GC_THRESHOLDS, SyncKitService, tune_garbage_collection
from synckit.tap import Options, makeService

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TWISTD, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=os.path.join(os.path.dirname(__file__), ".."),
    )


class PluginTests(SynchronousTestCase):
    def test_help_lists_every_option(self) -> None:
        """`twistd synckit --help` documents every setting with its environment variable."""
        result = twistd("synckit", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        flat = " ".join(result.stdout.split())
        # help wraps a long variable name at an underscore, so it is looked for without spaces
        packed = "".join(flat.split())
        for setting in SETTINGS:
            self.assertIn(f"--{setting.option} " if setting.flag else f"--{setting.option}=", flat)
            self.assertIn(f"env{setting.env}", packed)

    def test_version(self) -> None:
        """`twistd -n synckit --version` prints the version and exits 0."""
        result = twistd("-n", "synckit", "--version")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, f"synckit {__version__}"))

    def test_bad_option_fails_before_starting(self) -> None:
        """A bad value stops twistd with an error naming the option, before anything listens."""
        result = twistd("-n", "--pidfile=", "synckit", "--port", "eighty")
        self.assertEqual(result.returncode, 1)
        self.assertIn("--port", result.stdout + result.stderr)
        self.assertNotIn("listening", result.stdout + result.stderr)

    def test_bad_environment_fails_naming_the_variable(self) -> None:
        """A bad environment value is reported with the variable's name."""
        result = twistd("-n", "--pidfile=", "synckit", env={"SYNCKIT_AUTH_REQUIRED": "nope"})
        self.assertEqual(result.returncode, 1)
        self.assertIn("SYNCKIT_AUTH_REQUIRED", result.stdout + result.stderr)


class SignalTests(SynchronousTestCase):
    def run_and_signal(self, signum: int) -> tuple[int, str]:
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "synckit", "--port", "0", "--host", "127.0.0.1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=os.path.join(os.path.dirname(__file__), ".."),
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        output = b""
        deadline = time.monotonic() + 30
        while b"synckit listening" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([process.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            output += os.read(process.stdout.fileno(), 4096)
        self.assertIn(b"synckit listening", output)
        process.send_signal(signum)
        rest, _ = process.communicate(timeout=30)
        return process.returncode, (output + rest).decode()

    def test_sigterm_exits_zero(self) -> None:
        """SIGTERM shuts the daemon down gracefully and it exits 0, not by the signal."""
        code, output = self.run_and_signal(signal.SIGTERM)
        self.assertEqual(code, 0, output)
        self.assertIn("received SIGTERM, shutting down", output)

    def test_sigint_exits_zero(self) -> None:
        """SIGINT (Ctrl-C under `make run`) does the same."""
        code, output = self.run_and_signal(signal.SIGINT)
        self.assertEqual(code, 0, output)


class MakeServiceTests(SynchronousTestCase):
    def test_builds_without_io(self) -> None:
        """makeService builds the tree; nothing listens until the service starts and the reactor runs."""
        options = Options()
        options.parseOptions(["--port", "0", "--host", "127.0.0.1"])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        self.assertIsInstance(service, SyncKitService)
        self.assertEqual(reactor.tcpServers, [])
        service.startService()
        reactor.run()  # MemoryReactor runs the callWhenRunning calls
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers], [(0, "127.0.0.1")])

    def test_localhost_listens_on_both_loopbacks(self) -> None:
        """HOST=localhost binds 127.0.0.1 and ::1, since clients may resolve it to either."""
        options = Options()
        options.parseOptions(["--port", "8090", "--host", "localhost"])
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        service.startService()
        reactor.run()
        self.assertEqual([interface for _, _, _, interface in reactor.tcpServers], ["127.0.0.1", "::1"])


class GarbageCollectionTests(SynchronousTestCase):
    def test_tuned_once_started(self) -> None:
        """
        The daemon collects cycles less often than CPython's default, and not among what
        start-up made (docs/performance.md).
        """
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        tune_garbage_collection()
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)
        self.assertGreater(gc.get_freeze_count(), 0)
