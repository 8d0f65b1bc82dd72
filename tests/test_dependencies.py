"""
Guards on the parts of our dependencies that are not their public interface, but that synckit
relies on anyway, each for a reason its own code gives (mostly the CPU of the hot path).

Each test checks, against the installed package, what one such use relies on, and fails naming
the dependency, its version, the part that changed and what in synckit to check.  setup.py caps
these dependencies below their next release line; to raise a cap, install the new version and
run this module first.
"""

from __future__ import annotations

import ast
import collections
import inspect
import pprint
from importlib.metadata import version
from inspect import isfunction, signature
from typing import Any, Callable, Optional

import psycopg2.extensions
import txaio
import txredisapi
from autobahn.twisted import websocket as autobahn_twisted
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.util import peer2str
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket import xormasker
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel, Request
from txpostgres import reconnection, retrying, txpostgres

from synckit import websocket
from synckit.limits import UNIX_PEER
from synckit.output import backlog, plain_socket
from synckit.tasks import run_now
from synckit.timeouts import within
from synckit.wire import Frame
from synckit.web import make_listener
from synckit.websocket import SyncProtocol, client_ip
from tests.helpers import Harness, binary
from tests.services import shared_redis
from tests.test_upgrade import HEALTH, upgrade
from tests.test_websocket import connect


def names(function: Callable[..., Any]) -> set[str]:
    """The global and attribute names a function's code (and the functions nested in it) uses."""
    code = function.__code__
    found = set(code.co_names)
    for constant in code.co_consts:
        if hasattr(constant, "co_names"):
            found |= set(constant.co_names)
    return found


def changed(distribution: str, part: str, check: str) -> str:
    return f"{distribution} {version(distribution)}: {part} is not what synckit relies on. {check}"


def assert_uses(
    test: SynchronousTestCase, distribution: str, function: Callable[..., Any], used: set[str], check: str
) -> None:
    """That C{function} still uses each name in C{used}: the part of its work synckit counts on."""
    missing = used - names(function)
    test.assertFalse(
        missing, changed(distribution, f"{function.__qualname__} (no longer uses {sorted(missing)})", check)
    )


class AutobahnTests(SynchronousTestCase):
    """synckit/websocket.py: its shortcuts through Autobahn's WebSocket protocol."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.patch(txaio.config, "loop", self.clock)

    def open(self) -> tuple[Any, Any, SyncProtocol]:
        pump, client, server = connect(Harness(clock=self.clock))
        self.addCleanup(lambda: (server.dropConnection(abort=True), pump.flush()))
        return pump, client, server

    def test_masker_factory_is_looked_up_for_every_frame(self) -> None:
        """
        synckit replaces C{create_xor_masker} in Autobahn's protocol module (there is no
        option) so that small frames are unmasked by L{websocket.SmallFrameMasker}: Autobahn
        must still look it up there, by that name, with (mask, length), when it reads a frame.
        """
        check = "Check that synckit.websocket.create_masker still unmasks what Autobahn reads."
        self.assertIs(
            autobahn_protocol.create_xor_masker,
            websocket.create_masker,
            changed("autobahn", "the module-wide masker", check),
        )
        assert_uses(self, "autobahn", WebSocketProtocol.processData, {"create_xor_masker"}, check)
        self.assertEqual(
            list(signature(xormasker.create_xor_masker).parameters),
            ["mask", "length"],
            changed("autobahn", "create_xor_masker's signature", check),
        )
        for method in ("process", "pointer", "reset"):
            self.assertTrue(
                hasattr(xormasker.create_xor_masker(b"abcd", 5000), method),
                changed("autobahn", f"the masker's {method}()", check),
            )
        made: list[int] = []

        class Counted(websocket.SmallFrameMasker):
            def __init__(self, mask: bytes) -> None:
                made.append(1)
                super().__init__(mask)

        pump, client, _ = self.open()
        self.patch(websocket, "SmallFrameMasker", Counted)
        client.sendMessage(binary("ping", {}), isBinary=True)
        pump.flush()
        self.assertTrue(made, changed("autobahn", "reading a masked frame", check))

    def test_debug_highlights_only_in_log_calls(self) -> None:
        """
        synckit/websocket.py makes Autobahn's C{hltype} and C{hlval} lazy in its protocol modules:
        that holds only while every call of theirs there is a keyword argument of a log call.
        """
        check = "Check the hltype/hlval swap at the top of synckit/websocket.py."
        for module in (autobahn_protocol, autobahn_twisted):
            tree = ast.parse(inspect.getsource(module))
            in_log_calls = {
                id(keyword.value)
                for call in ast.walk(tree)
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr in ("debug", "info", "warn", "error", "failure", "critical")
                for keyword in call.keywords
            }  # fmt: skip
            calls = [
                node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hltype", "hlval")
            ]  # fmt: skip
            self.assertTrue(calls, changed("autobahn", f"{module.__name__} (no hltype or hlval left)", check))
            for call in calls:
                where = f"{call.func.id} at {module.__name__} line {call.lineno}"  # type: ignore[attr-defined]
                self.assertIn(id(call), in_log_calls, changed("autobahn", where, check))

    def test_connection_options_formatted_through_the_module_pformat(self) -> None:
        """
        Autobahn pretty-prints its options for a debug line on every new connection;
        L{SyncProtocol._connectionMade} swaps its protocol module's C{pformat} for the time of
        the call, so that the line costs nothing unless it is logged.
        """
        check = "Check SyncProtocol._connectionMade, which swaps autobahn.websocket.protocol.pformat."
        self.assertIs(
            autobahn_protocol.pformat, pprint.pformat, changed("autobahn", "autobahn.websocket.protocol.pformat", check)
        )
        assert_uses(self, "autobahn", WebSocketProtocol._connectionMade, {"pformat"}, check)
        assert_uses(self, "autobahn", WebSocketServerProtocol._connectionMade, {"_connectionMade"}, check)
        assert_uses(
            self, "autobahn", autobahn_twisted.WebSocketAdapterProtocol.connectionMade, {"_connectionMade"}, check
        )
        formatted: list[Any] = []
        self.patch(autobahn_protocol, "pformat", lambda value: formatted.append(value) or "")
        self.open()
        ours = [value for value in formatted if "SyncFactory" in repr(value)]  # not the client's
        self.assertEqual(ours, [], changed("autobahn", "formatting the connection's options", check))

    def test_message_end(self) -> None:
        """
        L{SyncProtocol.onMessageEnd} replaces Autobahn's (which also fires an observer event
        through Deferreds, for every message), reading what Autobahn's C{onMessageBegin} and
        C{onMessageFrame} collect.  Autobahn's must still do nothing else.
        """
        check = "SyncProtocol.onMessageEnd replaces it: check it still does all that matters of Autobahn's."
        expected = {
            "_onMessage", "add_callbacks", "error", "failedByMe", "fire", "join", "log", "message_data",
            "message_is_binary", "track", "trackedTimings", "txaio",
        }  # fmt: skip
        found = names(WebSocketProtocol.onMessageEnd)
        self.assertEqual(
            found,
            expected,
            changed("autobahn", f"WebSocketProtocol.onMessageEnd (uses {sorted(found ^ expected)})", check),
        )
        self.assertEqual(
            names(autobahn_twisted.WebSocketAdapterProtocol._onMessage),
            {"onMessage"},
            changed("autobahn", "WebSocketAdapterProtocol._onMessage", check),
        )
        protocol = WebSocketProtocol()
        protocol.failedByMe = False
        protocol.onMessageBegin(True)
        protocol.onMessageFrame([b"ab", b"c"])
        protocol.onMessageFrame([b"d"])
        self.assertEqual(
            (b"".join(protocol.message_data), protocol.message_is_binary),
            (b"abcd", True),
            changed("autobahn", "message_data and message_is_binary", check),
        )

    def test_close_frame_and_its_timer(self) -> None:
        """
        L{SyncProtocol.close} sends its own close codes (1001, 1008, which C{sendClose} refuses)
        with C{sendCloseFrame}; Autobahn then times the peer's answer with
        C{closeHandshakeTimeoutCall}, which it leaves running if the peer drops TCP instead, and
        which L{SyncProtocol.onClose} therefore cancels.
        """
        check = "Check SyncProtocol.close and SyncProtocol.onClose."
        self.assertEqual(
            list(signature(WebSocketProtocol.sendCloseFrame).parameters), ["self", "code", "reasonUtf8", "isReply"],
            changed("autobahn", "WebSocketProtocol.sendCloseFrame's signature", check),
        )  # fmt: skip
        pump, client, server = connect(Harness(clock=self.clock, heartbeat_interval=0))
        server.close(1008, "Authentication timeout")  # the client is not pumped: it never answers
        self.assertEqual(server.state, WebSocketProtocol.STATE_CLOSING, changed("autobahn", "sendCloseFrame", check))
        self.assertTrue(
            callable(getattr(server.closeHandshakeTimeoutCall, "cancel", None)),
            changed("autobahn", "closeHandshakeTimeoutCall", check),
        )
        self.assertNotEqual(self.clock.getDelayedCalls(), [], changed("autobahn", "the close handshake's timer", check))
        client.transport.abortConnection()  # the peer drops TCP instead of answering
        pump.flush()
        self.assertEqual(
            self.clock.getDelayedCalls(), [], changed("autobahn", "cancelling closeHandshakeTimeoutCall", check)
        )

    def test_send_queue(self) -> None:
        """
        L{SyncProtocol.send_frame} writes to the transport itself, as C{sendData} does when
        nothing is queued, and through C{sendData} behind what Autobahn queued in its
        C{send_queue}, so that frames keep their order.
        """
        check = "Check SyncProtocol.send_frame, which writes past sendData when send_queue is empty."
        expected = {
            "STATE_CONNECTING", "STATE_OPEN", "STATE_PROXY_CONNECTING", "WebSocketProtocol", "_trigger", "append", "debug",
            "hltype", "hlval", "len", "log", "logOctets", "logTxOctets", "outgoingOctetsWireLevel", "peer",
            "preopenOutgoingOctetsWireLevel", "sendData", "send_queue", "state", "trafficStats", "transport", "write",
        }  # fmt: skip
        found = names(WebSocketProtocol.sendData)
        self.assertEqual(
            found, expected, changed("autobahn", f"WebSocketProtocol.sendData (uses {sorted(found ^ expected)})", check)
        )
        pump, client, server = self.open()
        self.assertIsInstance(server.send_queue, collections.deque, changed("autobahn", "send_queue", check))
        first, second, third = (Frame("pong", 0, {"id": str(n)}) for n in range(3))
        server.sendData(websocket.websocket_frame(first.encoded(True), True), sync=True)  # written now
        server.sendData(websocket.websocket_frame(second.encoded(True), True), sync=True)  # queued
        self.assertEqual(len(server.send_queue), 1, changed("autobahn", "send_queue", check))
        server.send_frame(third, binary=True)
        for _ in range(3):  # Autobahn writes one queued piece per reactor turn
            self.clock.advance(1)
        pump.flush()
        received = [message["id"] for message, _ in client.received]
        self.assertEqual(received, ["0", "1", "2"], changed("autobahn", "sendData's queue", check))

    def test_is_closed_fires_with_the_protocol(self) -> None:
        """
        Autobahn fires C{is_closed} with the protocol itself, a reference cycle that
        L{SyncProtocol} breaks by giving it a callback that drops the result.
        """
        check = "Check SyncProtocol.__init__, which adds a callback to is_closed."
        closed = WebSocketServerProtocol().is_closed
        self.assertIsInstance(closed, Deferred, changed("autobahn", "is_closed", check))
        self.assertFalse(closed.called, changed("autobahn", "is_closed", check))
        assert_uses(self, "autobahn", WebSocketProtocol.dropConnection, {"is_closed"}, check)

    def test_drop_connection(self) -> None:
        """L{SyncProtocol} drops a client that does not read with C{dropConnection(abort=True)}."""
        check = "Check SyncProtocol._overflow."
        self.assertEqual(
            list(signature(WebSocketProtocol.dropConnection).parameters),
            ["self", "abort"],
            changed("autobahn", "dropConnection", check),
        )

    def test_peer_strings(self) -> None:
        """L{client_ip} reads the client's address out of Autobahn's peer string."""
        check = "Check synckit.websocket.client_ip."
        for address, ip in (
            (IPv4Address("TCP", "192.0.2.1", 5), "192.0.2.1"),
            (IPv6Address("TCP", "2001:db8::1", 5), "2001:db8::1"),
            (UNIXAddress(b"/run/synckit/synckit.sock"), UNIX_PEER),
            (UNIXAddress(None), UNIX_PEER),
        ):
            peer = peer2str(StringTransport(peerAddress=address))
            self.assertEqual(client_ip({}, peer), ip, changed("autobahn", f"the peer string {peer!r}", check))

    def test_resource_hands_over_inside_a_protocol_wrapper(self) -> None:
        """
        C{WebSocketResource} (an upgrade on a kept-alive HTTP connection) hands the connection
        over by setting C{wrappedProtocol} when the transport is a protocol wrapper, which every
        synckit connection is (L{synckit.upgrade.Routed}): that is how L{synckit.web._Counted}
        sees an upgrade, and the transport's own C{protocol} is never replaced.
        """
        check = "Check synckit.upgrade.Routed and synckit.web._Counted.wrappedProtocol."
        assert_uses(self, "autobahn", WebSocketResource.render, {"wrappedProtocol"}, check)
        harness = Harness(clock=self.clock)
        listener = make_listener(harness.server, harness.server.config)
        listener.site.reactor = self.clock
        wrapper = listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000))
        transport.protocol = wrapper
        wrapper.makeConnection(transport)
        wrapper.dataReceived(HEALTH)
        wrapper.dataReceived(upgrade())
        self.assertIs(transport.protocol, wrapper, changed("autobahn", "WebSocketResource's hand-over", check))
        self.assertIsInstance(
            wrapper.wrappedProtocol, SyncProtocol, changed("autobahn", "WebSocketResource's hand-over", check)
        )
        self.assertIsNone(wrapper.address, changed("autobahn", "WebSocketResource's hand-over", check))
        wrapper.wrappedProtocol.dropConnection(abort=True)
        self.clock.advance(1)


class TwistedTests(SynchronousTestCase):
    """synckit/upgrade.py, synckit/web.py and synckit/tasks.py: Twisted beyond its interfaces."""

    def test_protocol_wrapper_relays_to_its_transport(self) -> None:
        """
        L{synckit.upgrade.Routed} is a C{ProtocolWrapper} with a router, not a
        C{WrappingFactory}, as its factory: only the two methods it overrides may use the
        factory.  Everything else a protocol asks of its transport (C{abortConnection},
        C{resumeProducing}, C{setTcpNoDelay}) must reach the real transport.
        """
        check = "Check synckit.upgrade.Routed.makeConnection and connectionLost."
        for name, member in vars(ProtocolWrapper).items():
            if isfunction(member) and name not in ("makeConnection", "connectionLost", "__init__"):
                self.assertNotIn("factory", names(member), changed("Twisted", f"ProtocolWrapper.{name}", check))
        wrapper = ProtocolWrapper(None, Protocol())  # type: ignore[arg-type]
        transport = StringTransport()
        wrapper.transport = transport
        self.assertEqual(
            wrapper.abortConnection, transport.abortConnection, changed("Twisted", "ProtocolWrapper.__getattr__", check)
        )

    def test_http_channel_hooks(self) -> None:
        """
        L{synckit.web.LimitedChannel} refuses a body from the request's declared length, before
        reading it, in C{allHeadersReceived}, and restarts its header clock in C{requestDone}:
        HTTPChannel's C{length} (C{None} when chunked), C{requests}, C{persistent}.
        """
        check = "Check synckit.web.LimitedChannel."
        seen: list[Any] = []

        class Answered(Request):
            def process(self) -> None:
                self.finish()

        class Channel(HTTPChannel):
            requestFactory = Answered

            def allHeadersReceived(self) -> None:
                seen.append((self.length, type(self.requests[-1]), self.persistent))
                super().allHeadersReceived()

            def requestDone(self, request: Request) -> None:
                seen.append(("done", type(request)))
                super().requestDone(request)

        channel = Channel()
        channel.callLater = Clock().callLater  # as the site gives each channel its reactor's
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        done = ("done", Answered)
        expected = [(5, Answered, True), done, (None, Answered, True), done, (0, Answered, True), done]
        self.assertEqual(
            seen,
            expected,
            changed("Twisted", "HTTPChannel.allHeadersReceived, length, requests, persistent or requestDone", check),
        )
        channel.connectionLost(None)  # type: ignore[arg-type]

    def test_awaiting_a_deferred(self) -> None:
        """
        L{run_now} drives a coroutine by hand: awaiting an unfired Deferred yields that
        Deferred, and resuming the coroutine from that Deferred's callback reads its result.
        """
        check = "Check synckit.tasks.run_now and _resume."

        async def twice(d: Deferred) -> Any:
            return (await d) * 2

        waiting: Deferred[int] = Deferred()
        coroutine = twice(waiting)
        self.assertIs(coroutine.send(None), waiting, changed("Twisted", "Deferred.__await__", check))
        resumed: list[Any] = []

        def resume(result: Any) -> None:
            try:
                coroutine.send(None)
            except StopIteration as stop:
                resumed.append(stop.value)

        waiting.addBoth(resume)
        waiting.callback(21)
        self.assertEqual(resumed, [42], changed("Twisted", "Deferred.send (resuming an awaited Deferred)", check))
        # and awaiting a fired Deferred does not yield at all: run_now finishes without one
        self.assertIsNone(
            run_now(twice(_fired(2))), changed("Twisted", "Deferred.__await__ of a fired Deferred", check)
        )

    def test_fired_deferred_result(self) -> None:
        """
        The engine reads C{Deferred.result} to skip tracking a publication that is done already
        (synckit/sync/engine.py C{_publish}): a fired Deferred with no callbacks holds its result.
        """
        check = "Check SyncEngine._publish in synckit/sync/engine.py."
        d: Deferred[None] = Deferred()
        d.callback(None)
        self.assertTrue(d.called and d.result is None, changed("Twisted", "Deferred.result", check))


def _fired(value: Any) -> Deferred:
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d


class SocketTransportTests(TestCase):
    """synckit/output.py: a TCP transport's buffer, read and written past."""

    async def test_buffer_and_write_some_data(self) -> None:
        """
        L{write_now} and L{backlog} read a TCP transport's buffer: what C{write} has not sent is
        C{_tempDataLen} plus C{dataBuffer} past C{offset}, none once the reactor has sent it;
        and L{write_now} calls C{writeSomeData}, which sends at once and says how much it sent.
        """
        check = "Check synckit.output.write_now."
        accepted: Deferred = Deferred()
        factory = Factory()
        factory.buildProtocol = lambda addr: _Accepted(accepted)  # type: ignore[method-assign]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await endpoint.connect(Factory.forProtocol(_Receiver))
        transport = await accepted
        self.addCleanup(transport.abortConnection)
        self.assertIs(plain_socket(transport), transport, changed("Twisted", "tcp.Server", check))

        def idle() -> bool:
            return not transport._tempDataLen and transport.offset == len(transport.dataBuffer)

        self.assertTrue(idle(), changed("Twisted", "an unused transport's buffer", check))
        transport.write(b"abc")
        self.assertFalse(idle(), changed("Twisted", "FileDescriptor.write's buffer", check))
        self.assertEqual(backlog(transport), 3, changed("Twisted", "FileDescriptor.write's buffer", check))
        self.assertEqual(await client.wait_for(3), b"abc")
        self.assertTrue(idle(), changed("Twisted", "FileDescriptor.doWrite emptying the buffer", check))
        self.assertEqual(backlog(transport), 0, changed("Twisted", "FileDescriptor.doWrite", check))
        self.assertEqual(transport.writeSomeData(b"def"), 3, changed("Twisted", "tcp.Connection.writeSomeData", check))
        self.assertEqual(await client.wait_for(6), b"abcdef")


class _Accepted(Protocol):
    def __init__(self, accepted: Deferred) -> None:
        self._accepted = accepted

    def connectionMade(self) -> None:
        self._accepted.callback(self.transport)


class _Receiver(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self._waiting: Optional[tuple[int, Deferred]] = None

    def wait_for(self, size: int) -> Deferred:
        self._waiting = (size, Deferred())
        d = self._waiting[1]
        self.dataReceived(b"")
        return d

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self._waiting is not None and len(self.data) >= self._waiting[0]:
            d, self._waiting = self._waiting[1], None
            d.callback(self.data)


class TxredisapiTests(TestCase):
    """synckit/pubsub/redis.py: txredisapi's factory, used without its pool."""

    def test_factory_arguments(self) -> None:
        """The factory is made with its constructor's keywords, and reconnects with these delays."""
        check = "Check synckit.pubsub.redis._Factory."
        parameters = set(signature(txredisapi.RedisFactory.__init__).parameters)
        wanted = {"uuid", "dbid", "poolsize", "isLazy", "charset", "password", "convertNumbers", "username"}
        self.assertLessEqual(wanted, parameters, changed("txredisapi", "RedisFactory()", check))
        for name in ("initialDelay", "maxDelay", "startConnecting", "disconnect", "buildProtocol"):
            self.assertTrue(
                hasattr(txredisapi.RedisFactory, name), changed("txredisapi", f"RedisFactory.{name}", check)
            )
        assert_uses(self, "txredisapi", txredisapi.RedisFactory.buildProtocol, {"protocol"}, check)

    def test_commands_fail_at_once_when_not_connected(self) -> None:
        """A command on a protocol that is not connected raises C{ConnectionError}, which the pub/sub reports."""
        check = "Check RedisPubSub._call."
        with self.assertRaises(txredisapi.ConnectionError, msg=changed("txredisapi", "execute_command", check)):
            txredisapi.RedisProtocol().publish("c", b"m")

    async def test_factory_deferred(self) -> None:
        """
        C{RedisFactory.deferred} fires once the factory's connection is ready, and fails at once
        when Redis refuses the password: L{RedisPubSub.start} waits on it.
        """
        check = "Check RedisPubSub._start."
        redis = shared_redis()
        for password, ok in ((None, True), ("wrong", False)):
            factory = txredisapi.RedisFactory(None, None, 1, isLazy=True, password=password)
            self.assertIsInstance(factory.deferred, Deferred, changed("txredisapi", "RedisFactory.deferred", check))
            ready = factory.deferred
            factory.startConnecting(HostnameEndpoint(reactor, "127.0.0.1", redis.port))
            try:
                outcome = await within(ready, 5, reactor).addCallbacks(lambda _: True, lambda _: False)
            finally:
                await factory.disconnect()
            self.assertEqual(outcome, ok, changed("txredisapi", "RedisFactory.deferred", check))


class TxpostgresTests(SynchronousTestCase):
    """synckit/storage/postgres.py: its connection, detector and pool, beyond txpostgres' interface."""

    def test_connection_read_and_cursor_hooks(self) -> None:
        """
        C{_Connection} keeps a connection off the reactor while it is idle: its C{doRead} is
        C{_PollingMixin.doRead} alone, and its C{cursorFinished} only takes the cursor out of
        C{_cursors}, where txpostgres' would also watch the socket again for NOTIFY.
        """
        check = "Check synckit.storage.postgres._Connection.doRead and cursorFinished."
        assert_uses(self, "txpostgres", txpostgres._PollingMixin.doRead, {"removeReader", "continuePolling"}, check)
        assert_uses(
            self, "txpostgres", txpostgres.Connection.doRead, {"doRead", "checkForNotifies", "addReader"}, check
        )
        assert_uses(self, "txpostgres", txpostgres.Connection.cursorFinished, {"_cursors", "addReader"}, check)
        assert_uses(self, "txpostgres", txpostgres.Connection.cursorRunning, {"_cursors"}, check)
        connection = txpostgres.Connection(MemoryReactorClock())
        self.assertEqual(
            (connection._cursors, connection._connection),
            (set(), None),
            changed("txpostgres", "Connection._cursors or _connection", check),
        )

    def test_every_query_runs_under_the_lock(self) -> None:
        """PostgresStorage waits on each connection's C{lock} for its last query before closing it."""
        check = "Check PostgresStorage._stop."
        connection = txpostgres.Connection(MemoryReactorClock())
        self.assertIsInstance(connection.lock, DeferredLock, changed("txpostgres", "Connection.lock", check))
        assert_uses(self, "txpostgres", txpostgres.Connection._doit, {"lock", "run"}, check)

    def test_dead_connection_detector(self) -> None:
        """
        C{_Detector} rewrites C{startReconnecting} to keep a handle on its reconnection loop:
        txpostgres' must still be only that loop, started from C{checkForDeadConnection}.
        """
        check = "Check synckit.storage.postgres._Detector.startReconnecting, a rewrite of txpostgres'."
        expected = {
            "retrying", "RetryingCall", "reconnect", "reactor", "start", "reconnectionIterator", "addCallback",
            "connectionRecovered", "addErrback", "log", "err",
        }  # fmt: skip
        found = names(reconnection.DeadConnectionDetector.startReconnecting)
        self.assertEqual(
            found,
            expected,
            changed("txpostgres", f"DeadConnectionDetector.startReconnecting (uses {sorted(found ^ expected)})", check),
        )
        assert_uses(
            self, "txpostgres", reconnection.DeadConnectionDetector.checkForDeadConnection, {"startReconnecting"}, check
        )
        self.assertLessEqual(
            {"reconnectionIterator", "reactor"},
            set(signature(reconnection.DeadConnectionDetector).parameters),
            changed("txpostgres", "DeadConnectionDetector()", check),
        )
        self.assertLessEqual(
            {"initialDelay", "maxDelay", "factor", "maxRetries", "now"},
            set(signature(retrying.simpleBackoffIterator).parameters),
            changed("txpostgres", "simpleBackoffIterator()", check),
        )

    def test_pool_builds_connections_with_its_factory(self) -> None:
        """C{_Pool} sets the pool's C{reactor} and C{connectionFactory} before txpostgres builds its connections."""
        check = "Check synckit.storage.postgres._Pool."
        assert_uses(
            self,
            "txpostgres",
            txpostgres.ConnectionPool.__init__,
            {"connectionFactory", "reactor", "connections"},
            check,
        )

    def test_cancelling_waits_for_the_server(self) -> None:
        """
        Cancelling a query does not end it: txpostgres' canceller asks the server and raises
        C{_CancelInProgress}, and the query's Deferred fails with C{CancelledError} only when the
        server confirms.  L{synckit.timeouts.within} relies on that for C{settled}, and swallows
        what the canceller raises (so it must be an C{Exception}).
        """
        check = "Check synckit.timeouts.cancel and what PostgresStorage makes of a timed-out query's settled."
        self.assertTrue(
            issubclass(txpostgres._CancelInProgress, Exception), changed("txpostgres", "_CancelInProgress", check)
        )
        reactor = MemoryReactorClock()

        class Pollable:
            closed = False
            cancelled = False
            confirmed = False

            def poll(self) -> int:
                if self.confirmed:
                    raise psycopg2.extensions.QueryCanceledError("canceling statement due to user request")
                return psycopg2.extensions.POLL_READ

            def cancel(self) -> None:
                self.cancelled = True

            def fileno(self) -> int:
                return 99

        pollable = Pollable()

        class Polling(txpostgres._PollingMixin):
            def pollable(self) -> Pollable:
                return pollable

        polling = Polling()
        polling.reactor = reactor
        query = polling.poll()
        with self.assertRaises(Exception, msg=changed("txpostgres", "_PollingMixin._cancel", check)):
            query.cancel()
        self.assertTrue(pollable.cancelled, changed("txpostgres", "_PollingMixin._cancel", check))
        self.assertNoResult(query)
        pollable.confirmed = True
        polling.doRead()
        reactor.advance(0)
        self.failureResultOf(query, CancelledError)
