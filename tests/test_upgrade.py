"""
The port's first-read router (synckit.upgrade): whole upgrades to a WebSocket path go straight to
Autobahn, everything else to the site, which still serves upgrades it is handed; over
StringTransport, with time on a Clock.
"""

from __future__ import annotations

import txaio
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from synckit.upgrade import UpgradeRouter
from synckit.web import make_listener
from tests.helpers import Harness

UPGRADE = (
    b"GET /ws%s HTTP/1.1\r\nHost: localhost\r\n%s: %s\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"


def upgrade(query: bytes = b"", name: bytes = b"Upgrade", value: bytes = b"websocket") -> bytes:
    return UPGRADE % (query, name, value)


@implementer(ISSLTransport)
class TLSTransport(StringTransport):
    """A transport that claims TLS, as Twisted's TLS protocol does."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class RouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.site, self.ws = Factory(), Factory()
        self.router = UpgradeRouter(self.site, {b"/ws": self.ws})  # type: ignore[arg-type]

    def test_whole_upgrades_to_websocket_paths(self) -> None:
        """An upgrade to the path, with or without a query, in any header case, goes to Autobahn."""
        for data in (upgrade(), upgrade(b"?token=abc"), upgrade(name=b"upgrade", value=b"WebSocket")):
            self.assertIs(self.router.route(data), self.ws, data)

    def test_everything_else_to_the_site(self) -> None:
        """Other paths and methods, a GET without the upgrade, and a request not yet whole."""
        for data in (
            upgrade().replace(b"/ws", b"/health"),
            upgrade().replace(b"/ws", b"/wsx"),
            upgrade().replace(b"GET", b"POST"),
            upgrade(value=b"h2c"),
            b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n",
            upgrade()[:40],
            b"\x16\x03\x01 not HTTP at all\r\n\r\n",
        ):
            self.assertIs(self.router.route(data), self.site, data)


class HandOverTests(SynchronousTestCase):
    """The real listener on a server harness, a connection on a StringTransport."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.patch(txaio.config, "loop", self.clock)  # Autobahn's handshake timers
        self.harness = Harness(clock=self.clock, max_http_connections_per_ip=1)
        self.listener = make_listener(self.harness.server, self.harness.server.config)
        self.listener.site.reactor = self.clock
        self.transports: list[StringTransport] = []
        self.addCleanup(self.close_all)

    def connect(self, tls: bool = False) -> StringTransport:
        protocol = self.listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = (TLSTransport if tls else StringTransport)(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000))
        transport.protocol = protocol  # as a TCP connection has it
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return transport

    def close_all(self) -> None:
        for transport in self.transports:
            transport.protocol.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(0)
        self.assertEqual((self.harness.server.sessions, self.clock.getDelayedCalls()), (set(), []))

    def upgraded(self, tls: bool = False) -> StringTransport:
        """A connection whose first read is an upgrade, answered by Autobahn."""
        transport = self.connect(tls)
        transport.protocol.dataReceived(upgrade())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), transport.value())
        return transport

    def upgraded_after_a_request(self, tls: bool = False) -> StringTransport:
        """A connection that asks for /health, then upgrades: the site's WebSocket resource answers."""
        transport = self.connect(tls)
        transport.protocol.dataReceived(HEALTH)
        transport.clear()
        transport.protocol.dataReceived(upgrade())
        self.assertIn(b"HTTP/1.1 101 Switching Protocols\r\n", transport.value())
        return transport

    def test_upgrade_answered_by_autobahn(self) -> None:
        """A whole upgrade as the first read goes straight to Autobahn, inside the connection's wrapper."""
        transport = self.upgraded()
        wrapper = transport.protocol
        self.assertEqual(len(self.harness.server.sessions), 1)
        # handed over inside the wrapper: the transport's own protocol is never replaced
        self.assertIs(transport.protocol, wrapper)
        self.assertIsInstance(wrapper.wrappedProtocol, WebSocketServerProtocol)

    def test_no_timer_for_the_opening_handshake(self) -> None:
        """
        The handshake is answered within the read that brings it, so the connection sets no
        timer for it: the one it sets is the heartbeat's.  (Autobahn would set one and cancel
        it at once, on every connection.)
        """
        timer = self.listener._websockets[b"/ws"]._batched_timer
        delays: list[float] = []
        call_later = timer.call_later
        self.patch(timer, "call_later", lambda delay, *rest: delays.append(delay) or call_later(delay, *rest))
        self.upgraded()
        self.assertEqual(delays, [self.harness.server.config.heartbeat_interval / 1000])

    def test_upgrades_over_tls(self) -> None:
        """
        Over a transport claiming TLS, both ways to upgrade work: Autobahn insists that such a
        transport be Twisted's own TLS protocol, and the wrapper it is given does not claim it.
        """
        self.upgraded(tls=True)
        self.upgraded_after_a_request(tls=True)
        self.assertEqual(len(self.harness.server.sessions), 2)

    def test_websockets_leave_the_per_address_cap(self) -> None:
        """
        A connection stops counting against its address's cap on plain HTTP connections once it
        is a WebSocket, however it was upgraded (the cap here is one connection).
        """
        self.upgraded()
        kept_alive = self.connect()
        kept_alive.protocol.dataReceived(HEALTH)
        self.assertIsNone(self.listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4001)))
        kept_alive.protocol.dataReceived(upgrade())
        self.connect()

    def test_http_answered_by_the_site(self) -> None:
        """Any other first read goes to the site."""
        transport = self.connect()
        transport.protocol.dataReceived(HEALTH)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"), transport.value())

    def test_upgrade_after_a_request_on_the_same_connection(self) -> None:
        """The site still upgrades a kept-alive connection, through its WebSocket resource."""
        self.upgraded_after_a_request()
        self.assertEqual(len(self.harness.server.sessions), 1)

    def test_silent_connection_dropped_after_the_site_timeout(self) -> None:
        """A connection that never sends a byte is aborted after the site's idle timeout."""
        transport = self.connect()
        self.clock.advance(self.listener.site.timeOut - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)
