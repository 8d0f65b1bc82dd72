"""
The Autobahn adapter over an in-memory transport (iosim) with time on a Clock: heartbeats,
close codes and reply framing, with no sockets and no sleeps.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, WebSocketServerFactory
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from synckit import websocket, wire
from synckit.config import load
from synckit.websocket import SMALL_FRAME, SyncFactory, client_ip, create_masker, websocket_frame
from tests.helpers import Harness, binary
from tests.test_hostile import client_frame, server_frames


class Recorder(WebSocketClientProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[dict[str, Any], bool]] = []
        self.close_info: Any = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append((wire.decode(payload, lambda: ""), isBinary))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.close_info = (wasClean, code, reason)


def connect(harness: Harness, **options: Any) -> tuple[iosim.IOPump, Recorder, Any]:
    """
    A WebSocket client connected to a L{SyncProtocol} of C{harness}'s server in memory, past the
    opening handshake: the pump, the client, the server's protocol.  Autobahn's timers run on
    C{txaio.config.loop}, which the caller points at the harness's clock.
    """
    factory = SyncFactory(harness.server, harness.server.config)
    if options:
        factory.setProtocolOptions(**options)
    client_factory = WebSocketClientFactory("ws://localhost/ws")
    client_factory.protocol = Recorder
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
    client = client_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
    return pump, client, server


class AdapterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        # Autobahn schedules its timers (auto-ping, handshake timeouts) through txaio's loop.
        self.patch(txaio.config, "loop", self.clock)

    def connect(self, harness: Harness, **options: Any) -> tuple[iosim.IOPump, Recorder, Any]:
        return connect(harness, **options)

    def test_replies_in_binary_frames(self) -> None:
        """A binary request is answered with a binary frame the client can decode."""
        pump, client, _ = self.connect(Harness(clock=self.clock))
        client.sendMessage(binary("ping", {"id": "p"}), isBinary=True)
        pump.flush()
        [(message, is_binary)] = client.received
        self.assertEqual((message["type"], is_binary), ("pong", True))

    def test_masked_frames_of_any_size(self) -> None:
        """A client's masked frames, small and large, reach the session intact."""
        pump, client, _ = self.connect(Harness(clock=self.clock))
        for size in (10, SMALL_FRAME + 500):
            client.sendMessage(binary("ping", {"id": "p" * size}), isBinary=True)
            pump.flush()
        self.assertEqual([(m["type"], is_binary) for m, is_binary in client.received], [("pong", True)] * 2)

    def test_text_frames_switch_to_json(self) -> None:
        """After a text frame, replies are JSON text frames (docs/protocol.md section 2)."""
        pump, client, _ = self.connect(Harness(clock=self.clock))
        client.sendMessage(b'{"type":"ping","id":"p","timestamp":1}', isBinary=False)
        pump.flush()
        [(message, is_binary)] = client.received
        self.assertEqual((message["type"], is_binary), ("pong", False))

    def test_silent_peer_is_dropped(self) -> None:
        """
        A peer that stops answering WebSocket pings is dropped after the heartbeat timeout, and
        its session is forgotten.
        """
        harness = Harness(clock=self.clock, heartbeat_interval=30_000)
        pump, client, server = self.connect(harness)
        self.assertEqual(len(harness.server.sessions), 1)
        self.clock.advance(30)  # the server pings; the client never sees it (no pump)
        self.clock.advance(31)  # no pong within the timeout
        pump.flush()
        self.assertEqual(len(harness.server.sessions), 0)
        self.assertTrue(server.transport.disconnecting or server.transport.disconnected)

    def test_answering_peer_stays(self) -> None:
        """A peer that answers pings (Autobahn does so itself) stays connected through many intervals."""
        harness = Harness(clock=self.clock, heartbeat_interval=30_000)
        pump, client, _ = self.connect(harness)
        for _ in range(5):
            self.clock.advance(30)
            pump.flush()
        self.assertEqual(len(harness.server.sessions), 1)
        self.assertIsNone(client.close_info)

    def test_auth_failure_closes_1008(self) -> None:
        """A bad token gets auth_error, then a close frame with 1008 "Authentication failed"."""
        pump, client, _ = self.connect(Harness(clock=self.clock))
        client.sendMessage(binary("auth", {"id": "a", "token": "not-a-jwt"}), isBinary=True)
        pump.flush()
        self.assertEqual([m["type"] for m, _ in client.received], ["auth_error"])
        self.assertEqual(client.close_info, (True, 1008, "Authentication failed"))

    def test_sending_is_not_answering_pings(self) -> None:
        """
        A peer that keeps sending messages but never answers a ping is dropped at the heartbeat
        timeout: only a pong counts as proof that it reads (Autobahn would count any message).
        """
        harness = Harness(clock=self.clock, heartbeat_interval=30_000)
        pump, client, server = self.connect(harness)
        self.clock.advance(30)  # the server pings; the client never sees it (no pump)
        for _ in range(7):
            self.clock.advance(5)
            server.dataReceived(client_frame(binary("ping", {})))
        self.assertTrue(server.transport.disconnecting)
        pump.flush()
        self.assertEqual(len(harness.server.sessions), 0)

    def test_unread_bytes_over_the_send_queue_drop_the_connection(self) -> None:
        """
        Once the transport says its buffer is full, what is sent is counted: past max-send-queue
        the connection is dropped (not closed with a frame, which would wait behind the rest)
        and nothing more is written; an emptied buffer starts the count again.
        """
        harness = Harness(clock=self.clock, max_send_queue=100_000)
        pump, client, server = self.connect(harness)
        [session] = harness.server.sessions
        big = wire.Frame("awareness_state", 1, {"id": "x", "states": "y" * 60_000})
        server.pauseProducing()
        session.send(big)
        server.resumeProducing()
        server.pauseProducing()
        session.send(big)
        self.assertFalse(server.transport.disconnecting)
        written = len(server.transport.stream)
        session.send(big)
        self.assertTrue(server.transport.disconnecting)
        self.assertEqual(len(server.transport.stream), written)
        pump.flush()
        self.assertEqual(len(harness.server.sessions), 0)

    def test_a_client_that_reads_is_not_dropped_however_much_is_sent(self) -> None:
        """
        Past max-send-queue bytes sent since the buffer filled, the socket's real backlog
        decides: a client that keeps reading stays, however long the buffer never empties.
        """
        harness = Harness(clock=self.clock, max_send_queue=100_000)
        pump, client, server = self.connect(harness)
        [session] = harness.server.sessions
        big = wire.Frame("awareness_state", 1, {"id": "x", "states": "y" * 60_000})
        socket_holds = [1_000]
        self.patch(websocket, "backlog", lambda transport: socket_holds[0])
        server.pauseProducing()
        for _ in range(5):
            session.send(big)
        self.assertFalse(server.transport.disconnecting)
        socket_holds[0] = 50_000  # now it falls behind
        session.send(big)
        self.assertTrue(server.transport.disconnecting)

    def test_replies_to_one_read_leave_in_one_write(self) -> None:
        """
        The replies to the messages of one read are written together when the read is handled,
        in order; a close frame Autobahn sends in the same read goes after them.
        """
        pump, client, server = self.connect(Harness(clock=self.clock))
        writes: list[bytes] = []
        self.patch(server.transport, "write", writes.append)
        requests = b"".join(client_frame(binary(kind, {"id": "r"})) for kind in ("ping", "subscribe", "ping"))
        server.dataReceived(requests + client_frame(struct.pack("!H", 1000), opcode=0x8))
        [first, close] = writes
        replies = [(op, wire.decode(payload, lambda: "")["type"]) for op, payload in server_frames(first)]
        self.assertEqual(replies, [(0x2, "pong"), (0x2, "error"), (0x2, "pong")])
        self.assertEqual([op for op, _ in server_frames(close)], [0x8])

    def test_a_frame_sent_outside_a_read_is_written_at_once(self) -> None:
        """Outside any batch (a timer, storage answering), a frame is written when it is sent."""
        harness = Harness(clock=self.clock)
        pump, client, server = self.connect(harness)
        writes: list[bytes] = []
        self.patch(server.transport, "write", writes.append)
        [session] = harness.server.sessions
        session.send(wire.Frame("pong", 1, {"id": "x"}))
        self.assertEqual([op for op, _ in server_frames(b"".join(writes))], [0x2])

    def test_unauthenticated_connection_closed_after_auth_timeout(self) -> None:
        """
        With auth required, a connection that has not authenticated within auth-timeout gets
        "Authentication timeout" and a close (1008); one that authenticated stays, and closing
        it leaves nothing scheduled.
        """
        harness = Harness(clock=self.clock, auth_required=True, auth_timeout=10_000, api_keys=("k",))
        pump, idle, _ = self.connect(harness)
        pump2, authed, _ = self.connect(harness)
        authed.sendMessage(binary("auth", {"id": "a", "apiKey": "k"}), isBinary=True)
        pump2.flush()
        self.clock.advance(10)
        pump.flush()
        pump2.flush()
        self.assertEqual([m.get("error") for m, _ in idle.received], ["Authentication timeout"])
        self.assertEqual(idle.close_info, (True, 1008, "Authentication timeout"))
        self.assertIsNone(authed.close_info)
        harness.server.close_all(1001, "Server shutdown")
        pump2.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_auth_timeout_when_auth_is_off_or_zero(self) -> None:
        """No deadline is set when auth is not required, or auth-timeout is 0."""
        for overrides in ({"auth_required": False}, {"auth_required": True, "auth_timeout": 0}):
            self.connect(Harness(clock=self.clock, heartbeat_interval=0, **overrides))
            self.assertEqual(self.clock.getDelayedCalls(), [], overrides)

    def test_no_timers_left_after_close(self) -> None:
        """Once a connection is closed, nothing of it remains scheduled."""
        harness = Harness(clock=self.clock, heartbeat_interval=30_000)
        pump, client, _ = self.connect(harness)
        harness.server.close_all(1001, "Server shutdown")
        pump.flush()
        self.assertEqual(client.close_info, (True, 1001, "Server shutdown"))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ClientAddressTests(SynchronousTestCase):
    def test_forwarded_headers_ignored_without_trusted_proxies(self) -> None:
        """
        With no trusted proxies, X-Forwarded-For and X-Real-IP are ignored: a client cannot pick
        its address past the per-address limit (trusted proxies: tests/test_http_limits.py).
        """
        self.assertEqual(client_ip({"x-forwarded-for": "10.0.0.1", "x-real-ip": "9.9.9.9"}, "tcp:1.2.3.4:5"), "1.2.3.4")

    def test_peer(self) -> None:
        """The socket's peer, IPv4 or IPv6."""
        self.assertEqual(client_ip({}, "tcp:1.2.3.4:5678"), "1.2.3.4")
        self.assertEqual(client_ip({}, "tcp6:::1:5678"), "::1")
        self.assertEqual(client_ip({}, ""), "unknown")

    def test_unix_socket_peer(self) -> None:
        """
        A unix socket's peers are all "unix"; a proxy there is believed only when trusted-proxies
        names "unix", so each client it forwards counts for its own address.
        """
        headers = {"x-forwarded-for": "203.0.113.7"}
        self.assertEqual(client_ip(headers, "unix"), "unix")
        self.assertEqual(client_ip(headers, "unix:/run/synckit/synckit.sock"), "unix")
        trusted = load({"trusted-proxies": "unix, 10.0.0.0/8"}, {}, None).trusted_proxies
        self.assertEqual(client_ip(headers, "unix", trusted), "203.0.113.7")
        self.assertEqual(client_ip(headers, "tcp:10.1.2.3:5", trusted), "203.0.113.7")


class FramingTests(SynchronousTestCase):
    def test_frames_match_autobahn(self) -> None:
        """Our frames are byte for byte what Autobahn prepares, at each length encoding's edges."""
        factory = WebSocketServerFactory()
        for size in (0, 125, 126, 65535, 65536, 70000):
            for is_binary in (True, False):
                payload = b"x" * size
                self.assertEqual(
                    websocket_frame(payload, is_binary),
                    factory.prepareMessage(payload, is_binary).payloadHybi,
                    (size, is_binary),
                )


class MaskerTests(SynchronousTestCase):
    def test_unmasks_as_autobahn_does(self) -> None:
        """
        Small and large payloads, whole or in pieces cut anywhere, unmask to the same bytes as
        with Autobahn's own masker, and the pointer counts what was processed.
        """
        rng = random.Random(6455)
        for size in (1, 2, 3, 4, 5, 7, 100, SMALL_FRAME - 1, SMALL_FRAME, SMALL_FRAME + 1, 5000):
            mask, payload = os.urandom(4), os.urandom(size)
            cuts = sorted(rng.sample(range(1, size), min(3, size - 1))) if size > 1 else []
            pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, size])]
            ours, theirs = create_masker(mask, size), create_xor_masker(mask, size)
            self.assertEqual(
                b"".join(ours.process(piece) for piece in pieces), theirs.process(payload), (size, cuts)
            )
            self.assertEqual(ours.pointer(), size)
            ours.reset()
            self.assertEqual(ours.pointer(), 0)
