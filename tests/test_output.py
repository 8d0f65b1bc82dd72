"""
Output batching (synckit.output): what a batch of work sends leaves at its end, each
connection's frames together, straight to the socket when nothing is buffered before them.
"""

from __future__ import annotations

from typing import Any, Union

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.trial.unittest import SynchronousTestCase

from synckit.output import OutputBatch, backlog, plain_socket, write_now
from synckit.upgrade import Routed


class Connection:
    def __init__(self, name: str, log: list[str], batch: OutputBatch, again: bool = False) -> None:
        self.name, self.log, self.batch, self.again = name, log, batch, again

    def release(self) -> None:
        self.log.append(self.name)
        if self.again:
            # Releasing runs a batch of its own that holds another connection: that batch is
            # the outermost one, and releases it at once.
            self.again = False
            with self.batch:
                self.batch.hold(Connection(self.name + "'", self.log, self.batch))


class OutputBatchTests(SynchronousTestCase):
    def test_released_at_the_outermost_exit_in_hold_order(self) -> None:
        batch, log = OutputBatch(), []
        self.assertFalse(batch.active)
        with batch:
            batch.hold(Connection("a", log, batch))
            with batch:
                self.assertTrue(batch.active)
                batch.hold(Connection("b", log, batch))
            self.assertEqual(log, [])
            batch.hold(Connection("c", log, batch))
        self.assertEqual(log, ["a", "b", "c"])
        self.assertFalse(batch.active)

    def test_what_a_release_holds_is_released_too(self) -> None:
        batch, log = OutputBatch(), []
        with batch:
            batch.hold(Connection("a", log, batch, again=True))
            batch.hold(Connection("b", log, batch))
        self.assertEqual(log, ["a", "a'", "b"])
        self.assertFalse(batch.active)


class Failing:
    def release(self) -> None:
        raise OSError("broken")


class OutputBatchFailureTests(SynchronousTestCase):
    def test_one_failing_connection_does_not_keep_the_others_frames(self) -> None:
        batch, log = OutputBatch(), []
        with batch:
            batch.hold(Failing())
            batch.hold(Connection("b", log, batch))
        self.assertEqual(log, ["b"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class FakeSocket:
    """The parts of Twisted's socket transport that write_now reads and calls."""

    connected = True
    disconnecting = False

    def __init__(self, takes: Union[int, Exception, None] = None, buffered: bytes = b"") -> None:
        self._takes = takes
        self.dataBuffer = buffered
        self.offset = 0
        self._tempDataLen = 0
        self.sent: list[bytes] = []
        self.written: list[bytes] = []

    def writeSomeData(self, data: bytes) -> Union[int, Exception]:
        if isinstance(self._takes, Exception):
            return self._takes
        n = len(data) if self._takes is None else self._takes
        self.sent.append(bytes(data[:n]))
        return n

    def write(self, data: bytes) -> None:
        self.written.append(data)


class WriteNowTests(SynchronousTestCase):
    def test_idle_socket_takes_it_all(self) -> None:
        sock = FakeSocket()
        write_now(sock, b"abc")  # type: ignore[arg-type]
        self.assertEqual((sock.sent, sock.written), ([b"abc"], []))

    def test_what_the_kernel_does_not_take_is_buffered(self) -> None:
        sock = FakeSocket(takes=1)
        write_now(sock, b"abc")  # type: ignore[arg-type]
        self.assertEqual((sock.sent, sock.written), ([b"a"], [b"bc"]))

    def test_nothing_overtakes_what_is_buffered(self) -> None:
        for sock in (FakeSocket(buffered=b"earlier"), FakeSocket()):
            if not sock.dataBuffer:
                sock._tempDataLen = 3  # written this turn, not yet joined into dataBuffer
            write_now(sock, b"abc")  # type: ignore[arg-type]
            self.assertEqual((sock.sent, sock.written), ([], [b"abc"]))

    def test_a_lost_or_closing_connection_is_left_to_the_transport(self) -> None:
        lost = FakeSocket(takes=ConnectionLost())
        write_now(lost, b"abc")  # type: ignore[arg-type]
        self.assertEqual(lost.written, [b"abc"])
        closing = FakeSocket()
        closing.disconnecting = True
        write_now(closing, b"abc")  # type: ignore[arg-type]
        self.assertEqual((closing.sent, closing.written), ([], [b"abc"]))


class PlainSocketTests(SynchronousTestCase):
    def test_only_twisted_socket_transports_without_tls(self) -> None:
        self.assertIsNone(plain_socket(StringTransport()))
        routed = Routed.__new__(Routed)
        routed.transport = StringTransport()
        self.assertIsNone(plain_socket(routed))

        sock: Any = tcp.Server.__new__(tcp.Server)
        sock.TLS = False
        self.assertIs(plain_socket(sock), sock)
        routed.transport = sock
        self.assertIs(plain_socket(routed), sock)
        sock.TLS = True  # TLS started on the socket: writeSomeData would bypass it
        self.assertIsNone(plain_socket(routed))
        self.assertIsNone(plain_socket(IPv4Address("TCP", "127.0.0.1", 0)))


class BacklogTests(SynchronousTestCase):
    def test_what_the_socket_holds_under_any_wrappers(self) -> None:
        sock: Any = tcp.Server.__new__(tcp.Server)
        sock.dataBuffer, sock.offset, sock._tempDataLen = b"abcdef", 2, 3
        self.assertEqual(backlog(sock), 7)
        tls = ProtocolWrapper.__new__(ProtocolWrapper)  # TLSMemoryBIOProtocol is one
        tls.transport = sock
        routed = Routed.__new__(Routed)
        routed.transport = tls
        self.assertEqual(backlog(routed), 7)
        self.assertIsNone(backlog(StringTransport()))
