"""
The real service on a real port, driven by real WebSocket and HTTP clients: what a SyncKit
client sees from ``twistd synckit``.
"""

from __future__ import annotations

import json
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.web.client import Agent, readBody

from tests.wsclient import ServiceCase


class ServiceTests(ServiceCase):
    def test_two_clients_sync(self) -> Deferred:
        """
        A write by one client is acknowledged, then broadcast to every subscriber, the writer
        included, and a later sync_request sees it.
        """

        async def run() -> None:
            _, port = await self.started()
            alice, bob = await self.client(port), await self.client(port)
            for c, rid in ((alice, "a"), (bob, "b")):
                c.send("auth", {"id": f"auth-{rid}"})
                await c.wait_type("auth_success")
                c.send("sync_request", {"id": rid, "documentId": "doc-1"})
                response = await c.wait_type("sync_response")
                self.assertEqual((response["requestId"], response["state"]), (rid, {}))
            alice.send("delta", {"id": "w1", "documentId": "doc-1", "delta": {"title": "héllo"}, "vectorClock": {}})
            ack = await alice.wait_type("ack")
            self.assertEqual(ack["messageId"], "w1")
            for c in (alice, bob):
                delta = await c.wait_type("delta")
                self.assertEqual((delta["field"], delta["value"], delta["clientId"]), ("title", "héllo", "server"))
            bob.send("sync_request", {"id": "again", "documentId": "doc-1"})
            self.assertEqual((await bob.wait_type("sync_response"))["state"], {"title": "héllo"})

        return ensureDeferred(run())

    def test_nagle_off_on_websocket_connections(self) -> Deferred:
        """
        The server's side of a WebSocket connection has TCP_NODELAY on, so a reply is sent at
        once rather than held for the client's delayed ACK.
        """

        async def run() -> None:
            service, port = await self.started()
            client = await self.client(port)
            client.send("ping", {})
            await client.wait_type("pong")
            [session] = service.server.sessions
            handle = session.client.transport.getHandle()
            self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        return ensureDeferred(run())

    def test_health_and_root(self) -> Deferred:
        """GET /health answers healthy with connection counts; GET / describes the server."""

        async def run() -> None:
            _, port = await self.started()
            client = await self.client(port)
            client.send("ping", {})
            await client.wait_type("pong")
            code, health = await self.get(port, "/health")
            self.assertEqual((code, health["status"]), (200, "healthy"))
            self.assertEqual(health["connections"]["totalConnections"], 1)
            code, info = await self.get(port, "/")
            self.assertEqual((code, info["name"], info["endpoints"]["ws"]), (200, "SyncKit Server", "/ws"))
            code, missing = await self.get(port, "/nope")
            self.assertEqual(code, 404)

        return ensureDeferred(run())

    def test_shutdown_flushes_then_closes_1001(self) -> Deferred:
        """
        Stopping the service delivers broadcasts still pending, then closes every WebSocket with
        1001 "Server shutdown", and stops listening.
        """

        async def run() -> None:
            service, port = await self.started()
            writer, reader = await self.client(port), await self.client(port)
            for c in (writer, reader):
                c.send("sync_request", {"id": "s", "documentId": "d"})
                await c.wait_type("sync_response")
            writer.send("delta", {"id": "w", "documentId": "d", "delta": {"k": 1}, "vectorClock": {}})
            await writer.wait_type("ack")
            # The broadcast is queued for the end of this reactor turn; stop before it runs.
            await service.stopService()
            self.assertEqual((await reader.closed)[0], 1001)
            self.assertEqual([m["field"] for m in reader.received if m["type"] == "delta"], ["k"])
            self.assertEqual(service.ports, [])

        return ensureDeferred(run())

    def test_test_clear_endpoint(self) -> Deferred:
        """POST /_test/clear exists only when switched on, and then empties every document."""

        async def run() -> None:
            _, port = await self.started()
            response = await Agent(reactor).request(b"POST", f"http://127.0.0.1:{port}/_test/clear".encode())
            await readBody(response)
            self.assertEqual(response.code, 404)

            _, port = await self.started(test_endpoints=True)
            client = await self.client(port)
            client.send("delta", {"id": "w", "documentId": "d", "delta": {"k": 1}, "vectorClock": {}})
            await client.wait_type("ack")
            response = await Agent(reactor).request(b"POST", f"http://127.0.0.1:{port}/_test/clear".encode())
            self.assertEqual((response.code, json.loads(await readBody(response))), (200, {"cleared": True}))
            client.send("sync_request", {"id": "s", "documentId": "d"})
            self.assertEqual((await client.wait_type("sync_response"))["state"], {})

        return ensureDeferred(run())

    def test_bad_frames_leave_connection_open(self) -> Deferred:
        """Garbage gets an error frame; the same connection then works normally."""

        async def run() -> None:
            _, port = await self.started()
            client = await self.client(port)
            client.sendMessage(b"\x00garbage", isBinary=True)
            self.assertEqual((await client.wait_type("error"))["error"], "Invalid message format")
            client.send("ping", {})
            await client.wait_type("pong")

        return ensureDeferred(run())

    def test_connection_limit_closes_1008(self) -> Deferred:
        """Past the per-address limit the handshake completes and the socket is closed with 1008."""

        async def run() -> None:
            _, port = await self.started(max_connections_per_ip=1)
            await self.client(port)
            second = await self.client(port)
            code, reason = await second.closed
            self.assertEqual((code, reason), (1008, "Too many connections from your IP"))

        return ensureDeferred(run())

    def test_oversize_message_closes_1009(self) -> Deferred:
        """A WebSocket message over the frame limit closes the connection with 1009."""

        async def run() -> None:
            _, port = await self.started(max_frame_size=4096)
            client = await self.client(port)
            client.sendMessage(b"x" * 10_000, isBinary=True)
            self.assertEqual((await client.closed)[0], 1009)

        return ensureDeferred(run())
