"""
The listening port's guards for plain HTTP (docs/security.md): connections per peer address,
the header deadline, the idle timeout, the body cap, which proxies' X-Forwarded-For is believed,
and what /health tells whom.  The real listener on a server harness, each connection on a
StringTransport, time on a Clock.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Optional

import txaio
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from synckit.limits import forwarded_client
from synckit.web import make_listener, metrics_site
from synckit.websocket import client_ip
from tests.helpers import Harness

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n%s"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
HEALTH = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
PROXIES = (ipaddress.ip_network("10.0.0.0/8"),)


class ListenerCase(SynchronousTestCase):
    def listen(self, **overrides: Any) -> None:
        self.clock = Clock()
        self.patch(txaio.config, "loop", self.clock)  # Autobahn's handshake timers
        self.harness = Harness(clock=self.clock, **overrides)
        self.listener = make_listener(self.harness.server, self.harness.server.config)
        self.open: list[StringTransport] = []
        self.addCleanup(self.close_all)

    def connect(self, host: str = "192.0.2.1") -> Optional[StringTransport]:
        """A new connection from C{host}, or C{None} if the port refuses it."""
        address = IPv4Address("TCP", host, 4000)
        protocol = self.listener.buildProtocol(address)
        if protocol is None:
            return None
        transport = StringTransport(peerAddress=address)
        transport.protocol = protocol  # as a TCP connection has it
        protocol.makeConnection(transport)
        self.open.append(transport)
        return transport

    def lose(self, transport: StringTransport) -> None:
        """The connection closes, as the reactor would close it."""
        self.open.remove(transport)
        transport.protocol.connectionLost(Failure(ConnectionDone()))

    def close_all(self) -> None:
        for transport in list(self.open):
            self.lose(transport)
        self.clock.advance(0)
        self.assertEqual((self.harness.server.sessions, self.clock.getDelayedCalls()), (set(), []))

    def response(self, transport: StringTransport) -> tuple[int, Any]:
        head, _, body = transport.value().partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), json.loads(body) if body else None


class HeaderDeadlineTests(ListenerCase):
    def test_trickled_headers_are_cut_off(self) -> None:
        """
        A client sending a header byte every second never completes its headers: it is closed
        at the header timeout, though it was never idle for as long as the idle timeout.
        """
        self.listen(http_header_timeout=3000, http_idle_timeout=60_000)
        transport = self.connect()
        transport.protocol.dataReceived(b"GET /health HTTP/1.1\r\n")
        for _ in range(2):
            self.clock.advance(1)
            transport.protocol.dataReceived(b"X")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_unfinished_upgrade_is_cut_off(self) -> None:
        """
        An upgrade request that stops short of its end is closed at the header timeout: it went
        to the site, not to Autobahn, whose own opening-handshake timer synckit switches off.
        """
        self.listen(http_header_timeout=3000, http_idle_timeout=60_000)
        transport = self.connect()
        transport.protocol.dataReceived((UPGRADE % b"")[:-10])
        self.clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual((transport.value(), self.harness.server.sessions), (b"", set()))

    def test_deadline_starts_again_after_each_response(self) -> None:
        """On a kept-alive connection the next request's headers have the same time again."""
        self.listen(http_header_timeout=3000)
        transport = self.connect()
        self.clock.advance(2)
        transport.protocol.dataReceived(HEALTH)
        self.assertEqual(self.response(transport)[0], 200)
        self.clock.advance(2)
        transport.clear()
        transport.protocol.dataReceived(HEALTH)
        self.assertEqual(self.response(transport)[0], 200)
        self.clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_idle_timeout(self) -> None:
        """A connection that goes quiet in the middle of a body is closed at the idle timeout."""
        self.listen(http_idle_timeout=5000, demo_login=True)
        transport = self.connect()
        transport.protocol.dataReceived(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{}")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)


class BodyCapTests(ListenerCase):
    def test_large_body_refused_from_its_length(self) -> None:
        """
        A 10 MB body announced to /auth/login is answered 413 and the connection closed as soon as
        the headers are in, before any of the body is sent.
        """
        self.listen(max_http_body_size=1000, demo_login=True)
        transport = self.connect()
        transport.protocol.dataReceived(
            b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n\r\n"
        )
        self.assertEqual(self.response(transport), (413, {"error": "Request body larger than 1000 bytes"}))
        self.assertTrue(transport.disconnecting)

    def test_body_within_the_cap_is_served(self) -> None:
        """A body up to the cap reaches the route."""
        self.listen(max_http_body_size=20, demo_login=True)
        transport = self.connect()
        body = b'{"email":"a@b.c"}'
        transport.protocol.dataReceived(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.assertEqual(self.response(transport), (400, {"error": "Email and password required"}))

    def test_chunked_body_refused(self) -> None:
        """A body of undeclared length (chunked) is refused with 411 rather than read to find its size."""
        self.listen(demo_login=True)
        transport = self.connect()
        transport.protocol.dataReceived(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(self.response(transport)[0], 411)
        self.assertTrue(transport.disconnecting)


class PerAddressTests(ListenerCase):
    def test_cap_per_peer_address(self) -> None:
        """
        Past the cap, a peer's next connection is refused before anything is read; other peers
        are not affected, and a closed connection frees its place.
        """
        self.listen(max_http_connections_per_ip=2)
        first, second = self.connect(), self.connect()
        second.protocol.dataReceived(b"GET /heal")  # one slow HTTP request
        self.assertIsNone(self.connect())
        self.assertIsNotNone(self.connect("192.0.2.2"))
        self.lose(first)
        self.assertIsNotNone(self.connect())

    def test_cap_follows_websocket_cap_by_default(self) -> None:
        """
        Unset, the cap is max-connections-per-ip: as many clients of one address may be in
        their handshake at once (a reconnect storm from behind one NAT) as may be connected.
        """
        self.listen(max_connections_per_ip=120)
        pending = [self.connect() for _ in range(120)]
        self.assertNotIn(None, pending)
        self.assertIsNone(self.connect())

    def test_silent_connections_count_and_are_dropped(self) -> None:
        """Connections that send nothing count too, and go at the idle timeout, freeing their places."""
        self.listen(max_http_connections_per_ip=1, http_idle_timeout=5000)
        silent = self.connect()
        self.assertIsNone(self.connect())
        self.clock.advance(5)
        self.assertTrue(silent.disconnected)
        self.lose(silent)
        self.assertIsNotNone(self.connect())

    def test_websockets_are_not_counted(self) -> None:
        """A connection that became a WebSocket leaves the HTTP count (WebSockets have their own cap)."""
        self.listen(max_http_connections_per_ip=1)
        websocket = self.connect()
        websocket.protocol.dataReceived(UPGRADE % b"")
        self.assertTrue(websocket.value().startswith(b"HTTP/1.1 101 "))
        http = self.connect()
        self.assertIsNotNone(http)
        self.assertIsNone(self.connect())
        self.lose(websocket)
        self.assertIsNone(self.connect())

    def test_trusted_proxies_are_exempt(self) -> None:
        """Every client behind a trusted proxy shares its address, so the proxy is not capped."""
        self.listen(max_http_connections_per_ip=1, trusted_proxies=PROXIES)
        self.assertTrue(all(self.connect("10.1.2.3") is not None for _ in range(5)))


class ForwardedForTests(ListenerCase):
    def test_websocket_ignores_headers_from_untrusted_peer(self) -> None:
        """
        X-Forwarded-For from a peer that is not a trusted proxy is ignored: the session's address
        (which the per-address WebSocket cap counts) is the peer's.
        """
        self.listen()
        transport = self.connect("192.0.2.7")
        transport.protocol.dataReceived(UPGRADE % b"X-Forwarded-For: 203.0.113.9\r\nX-Real-IP: 203.0.113.10\r\n")
        [session] = self.harness.server.sessions
        self.assertEqual(session.ip, "192.0.2.7")

    def test_client_ip_behind_trusted_proxies(self) -> None:
        """
        Behind trusted proxies the client is the right-most forwarded address that is not a proxy
        (the ones to its left are the client's to invent); X-Real-IP when there is no list.
        """
        headers = {"x-forwarded-for": "6.6.6.6, 203.0.113.9, 10.0.0.2"}
        self.assertEqual(client_ip(headers, "tcp:10.0.0.1:5", PROXIES), "203.0.113.9")
        self.assertEqual(client_ip(headers, "tcp6:::ffff:10.0.0.1:5", PROXIES), "203.0.113.9")
        self.assertEqual(client_ip(headers, "tcp:192.0.2.1:5", PROXIES), "192.0.2.1")
        self.assertEqual(client_ip(headers, "tcp:10.0.0.1:5"), "10.0.0.1")
        self.assertEqual(client_ip({"x-real-ip": "203.0.113.5"}, "tcp:10.0.0.1:5", PROXIES), "203.0.113.5")
        self.assertEqual(client_ip({}, "tcp:10.0.0.1:5", PROXIES), "10.0.0.1")
        self.assertEqual(forwarded_client("10.0.0.1", "10.0.0.3, 10.0.0.2", None, PROXIES), "10.0.0.3")

    def test_http_client_address(self) -> None:
        """An HTTP request's client (as logged for a refused body) follows the same rule."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.listen(max_http_body_size=10, trusted_proxies=PROXIES)
        request = b"POST /x HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\nContent-Length: 99\r\n\r\n"
        for peer in ("192.0.2.1", "10.0.0.1"):
            self.connect(peer).protocol.dataReceived(request)
        self.assertEqual([e["client"] for e in events if "client" in e], ["192.0.2.1", "203.0.113.9"])


class HealthTests(ListenerCase):
    def get_health(self, headers: bytes = b"") -> dict[str, Any]:
        transport = self.connect()
        transport.protocol.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n%s\r\n" % headers)
        return self.response(transport)[1]

    def test_anonymous_health_names_no_document(self) -> None:
        """
        With a cached document, anonymous /health gives its count but not its id or its
        client-supplied lastModified; an API key in X-API-Key gets the reference's list.
        """
        self.listen(api_keys=("k1",))
        session, _ = self.harness.connect()
        payload = {"id": "w", "documentId": "secret-doc", "delta": {"a": 1}, "vectorClock": {}}
        self.harness.send(session, "delta", payload)
        self.harness.flush()
        anonymous = self.get_health()
        self.assertEqual(anonymous["documents"], {"totalDocuments": 1})
        self.assertEqual(anonymous["connections"], {"totalConnections": 1})
        self.assertNotIn(b"secret-doc", json.dumps(anonymous).encode())
        detailed = self.get_health(b"X-API-Key: k1\r\n")
        self.assertEqual([d["id"] for d in detailed["documents"]["documents"]], ["secret-doc"])
        session.closed()

    def test_metrics_listener_health_is_detailed(self) -> None:
        """The metrics listener, for operators, serves /health with the details and no key."""
        self.listen()
        site = metrics_site(self.harness.server.metrics, self.harness.server)
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(HEALTH)
        self.assertEqual(self.response(transport)[1]["documents"], {"totalDocuments": 0, "documents": []})
        protocol.connectionLost(Failure(ConnectionDone()))

