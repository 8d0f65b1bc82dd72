"""
Hostile clients against the real service on a real port, with a well-behaved canary client
pinging throughout: fuzzed frames, lying lengths, invalid UTF-8, nesting, fragmentation, storms,
half-open handshakes and clients that do not read.  Each attack must leave the canary's round
trips succeeding, and the server serving.  The long form, for running by hand against a
``twistd -n synckit``, is ``tools/hostile``; these are bounded to a few seconds in all.
"""

from __future__ import annotations

import gc
import json
import os
import random
import struct
import weakref
from time import perf_counter
from typing import Any, Callable, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from synckit.service import SyncKitService
from tests.helpers import binary
from tests.wsclient import RecordingClient, ServiceCase

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)

#: the issue's decode bomb: 15 MB of empty arrays in one message
BOMB = b'{"a":[' + b",".join([b"[]"] * 5_000_000) + b"]}"


def client_frame(payload: bytes, opcode: int = 0x2, fin: bool = True, length: Optional[int] = None) -> bytes:
    """
    A client frame (RFC 6455 section 5.2), masked with a zero key (so the payload goes as it
    is); C{length} lies about the payload's length when given.
    """
    n = len(payload) if length is None else length
    head = bytes((0x80 * fin | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += struct.pack("!BH", 0x80 | 126, n)
    else:
        head += struct.pack("!BQ", 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the whole unmasked server frames in C{data}."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, n, i = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if n == 126:
            (n,), i = struct.unpack_from("!H", data, i), i + 2
        elif n == 127:
            (n,), i = struct.unpack_from("!Q", data, i), i + 8
        if i + n > len(data):
            break
        frames.append((opcode, data[i : i + n]))
        i += n
    return frames


class RawClient(Protocol):
    """A WebSocket client by hand, so that it can send anything: it records what comes back."""

    def __init__(self, handshake: bytes = UPGRADE) -> None:
        self.handshake = handshake
        self.data = b""
        self.upgraded: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        if self.handshake:
            self.transport.write(self.handshake)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.upgraded.called and b"\r\n\r\n" in self.data:
            head, _, self.data = self.data.partition(b"\r\n\r\n")
            self.upgraded.callback(head)

    def connectionLost(self, reason: Failure = None) -> None:
        self.lost.callback(None)

    def send(self, payload: bytes, opcode: int = 0x2, **kwargs: Any) -> None:
        self.transport.write(client_frame(payload, opcode, **kwargs))

    def frames(self) -> list[tuple[int, bytes]]:
        return server_frames(self.data)

    def errors(self) -> list[str]:
        """The C{error} texts received, in binary frames or (after a text frame) JSON ones."""
        found = []
        for op, p in self.frames():
            if op == 0x2 and p[:1] == b"\xff":
                found.append(json.loads(p[13:])["error"])
            elif op == 0x1 and json.loads(p)["type"] == "error":
                found.append(json.loads(p)["error"])
        return found

    def close_code(self) -> Optional[int]:
        closes = [p for op, p in self.frames() if op == 0x8]
        return struct.unpack("!H", closes[0][:2])[0] if closes else None


class Canary:
    """
    A well-behaved client that pings the server again and again and times each round trip from
    when its ping was due: the canary shares the reactor with the server, so a stall counts
    wherever it falls, while a ping is out or while the canary waits to send the next.
    """

    interval = 0.005

    def __init__(self, client: RecordingClient) -> None:
        self.client = client
        self.round_trips: list[float] = []
        self.failures: list[Failure] = []
        self._running = True
        self._done = ensureDeferred(self._run())

    async def _run(self) -> None:
        due = perf_counter()
        while self._running:
            self.client.send("ping", {})
            try:
                await self.client.wait_for(lambda m: m["type"] == "pong", timeout=5)
            except Exception:
                self.failures.append(Failure())
                return
            answered = perf_counter()
            self.round_trips.append(answered - due)
            due = answered + self.interval
            await sleep(self.interval)

    async def stop(self) -> tuple[int, float]:
        """Stop pinging; returns how many round trips there were and the slowest, in seconds."""
        self._running = False
        await self._done
        return len(self.round_trips), max(self.round_trips, default=0.0)


def sleep(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = perf_counter() + timeout
    while not condition():
        if perf_counter() > deadline:
            raise AssertionError("timed out waiting")
        await sleep(0.01)


class HostileCase(ServiceCase):
    async def serve(self, **overrides: Any) -> tuple[SyncKitService, int, Canary]:
        """The service, with a canary connected (with an API key, for when auth is required) and pinging."""
        service, port = await self.started(api_keys=("canary",), **overrides)
        client = await self.client(port)
        client.send("auth", {"apiKey": "canary"})
        await client.wait_type("auth_success")
        canary = Canary(client)
        await until(lambda: len(canary.round_trips) > 2)
        return service, port, canary

    async def raw(self, port: int, handshake: bytes = UPGRADE) -> RawClient:
        client = RawClient(handshake)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.lost.called or client.transport.abortConnection())
        if handshake == UPGRADE:
            head = await client.upgraded
            self.assertIn(b" 101 ", head.split(b"\r\n")[0])
        return client

    async def assertCanaryWell(self, canary: Canary, port: int, slowest: float = 1.0) -> None:
        """The canary's round trips all succeeded, none slower than C{slowest}; a new client is served."""
        count, worst = await canary.stop()
        self.assertEqual(canary.failures, [])
        self.assertGreater(count, 2)
        self.assertLess(worst, slowest)
        fresh = await self.client(port)
        fresh.send("ping", {})
        await fresh.wait_type("pong")


class DecodeBombTests(HostileCase):
    def test_bomb_does_not_stall_others(self) -> None:
        """
        Three 15 MB messages of empty arrays and one nested 15 MB deep are each answered with an
        error, and meanwhile every canary round trip takes under 100 ms (before, each bomb
        froze the server for seconds).
        """

        async def run() -> None:
            _, port, canary = await self.serve(max_frame_size=16 * 1024 * 1024)
            bomber = await self.raw(port)
            # Framed once, and sent one after the other: the bomber shares the reactor too.
            bomb = client_frame(BOMB, opcode=0x1)
            deep = client_frame(b'{"type":"ping","id":"x","timestamp":1,"a":' + b"[" * 7_000_000 + b"]" * 7_000_000 + b"}")
            for n, frame in enumerate((bomb, deep, bomb, bomb), 1):
                bomber.transport.write(frame)
                await until(lambda: len(bomber.errors()) == n, timeout=30)
            self.assertEqual(bomber.errors(), ["Invalid message format"] * 4)
            await self.assertCanaryWell(canary, port, slowest=0.1)

        return ensureDeferred(run())


class SlowReaderTests(HostileCase):
    def test_non_reader_dropped_and_freed(self) -> None:
        """
        A client that asks for a 500 KB document again and again and never reads is dropped
        once 1 MiB more than its socket holds waits for it, while the canary is served
        throughout; its session and protocol are freed at once, with the cyclic garbage
        collector off.
        """

        async def run() -> None:
            service, port, canary = await self.serve(max_send_queue=1024 * 1024)
            writer = await self.client(port)
            writer.send("delta", {"id": "w", "documentId": "big", "delta": {"k": "x" * 500_000}, "vectorClock": {}})
            await writer.wait_type("ack")
            known = set(service.server.sessions)
            reader = await self.raw(port)
            reader.transport.pauseProducing()  # never read again
            [session] = set(service.server.sessions) - known
            session_ref, protocol_ref = weakref.ref(session), weakref.ref(session.client)
            del session
            gc.disable()
            self.addCleanup(gc.enable)
            for n in range(400):
                if session_ref() is None or session_ref().client is not protocol_ref():
                    break
                reader.send(binary("sync_request", {"id": f"r{n}", "documentId": "big"}))
                await sleep(0.005)
            await until(lambda: len(service.server.sessions) == len(known))
            await sleep(0.05)
            self.assertIsNone(session_ref())
            self.assertIsNone(protocol_ref())
            await self.assertCanaryWell(canary, port)

        return ensureDeferred(run())


class MalformedFrameTests(HostileCase):
    def test_fuzz(self) -> None:
        """
        Hundreds of random frames (random bytes, random type codes with random JSON, truncated
        real messages) from several connections: no traceback is logged (trial fails the test
        on one), and the canary is served throughout.
        """

        async def run() -> None:
            _, port, canary = await self.serve()
            rng = random.Random(11)
            real = [binary(kind, {"id": "f", "documentId": "d", "delta": {"k": 1}}) for kind in ("delta", "ping", "subscribe")]
            clients = [await self.raw(port) for _ in range(4)]
            for i in range(600):
                choice = rng.randrange(4)
                if choice == 0:
                    payload = os.urandom(rng.randrange(1, 200))
                elif choice == 1:
                    body = json.dumps({"id": i, "documentId": rng.choice(["d", "", 5, None]), "x": [rng.random()]}).encode()
                    payload = struct.pack(">BqI", rng.randrange(256), rng.randrange(-(2**63), 2**63), len(body)) + body
                elif choice == 2:
                    whole = rng.choice(real)
                    payload = whole[: rng.randrange(len(whole))]
                else:
                    payload = b"{" + os.urandom(rng.randrange(50))
                clients[i % 4].send(payload, opcode=rng.choice((0x1, 0x2)) if choice != 3 else 0x2)
                if i % 50 == 0:
                    await sleep(0)
            await sleep(0.2)
            await self.assertCanaryWell(canary, port)

        return ensureDeferred(run())

    def test_lying_lengths(self) -> None:
        """
        Binary headers that claim more payload than there is, or less, or 4 GiB; a WebSocket
        frame claiming 2**62 bytes (closed 1009); a frame that promises more than it sends and
        stalls: each is refused or waits, and nobody else notices.
        """

        async def run() -> None:
            _, port, canary = await self.serve()
            liar = await self.raw(port)
            body = b'{"id":"p"}'
            liar.send(struct.pack(">BqI", 0x30, 0, len(body) + 5) + body)  # claims more
            liar.send(struct.pack(">BqI", 0x30, 0, 2**32 - 1) + body)  # claims 4 GiB
            liar.send(struct.pack(">BqI", 0x30, 0, 2) + b"{}" + b"trailing junk")  # claims less: a ping
            await until(lambda: len(liar.frames()) == 3)
            self.assertEqual(liar.errors(), ["Invalid message format"] * 2)
            huge = await self.raw(port)
            huge.transport.write(client_frame(b"", length=2**62)[:-4] + b"\0\0\0\0")
            await huge.lost
            self.assertEqual(huge.close_code(), 1009)
            staller = await self.raw(port)
            staller.transport.write(client_frame(b"x" * 100, length=10_000))
            await sleep(0.1)
            self.assertFalse(staller.lost.called)
            await self.assertCanaryWell(canary, port)

        return ensureDeferred(run())

    def test_invalid_utf8(self) -> None:
        """
        Invalid UTF-8 in a text frame fails that connection (1007, as RFC 6455 requires); in a
        binary message's JSON it is replaced, as the reference does, and the message works.
        """

        async def run() -> None:
            _, port, canary = await self.serve()
            text = await self.raw(port)
            text.send(b'{"type":"ping","id":"\xff\xfe","timestamp":1}', opcode=0x1)
            await text.lost
            self.assertEqual(text.close_code(), 1007)
            binary_client = await self.raw(port)
            body = b'{"id":"\xff\xc3("}'
            binary_client.send(struct.pack(">BqI", 0x30, 0, len(body)) + body)
            await until(lambda: len(binary_client.frames()) == 1)
            [(_, pong)] = binary_client.frames()
            self.assertEqual(pong[0], 0x31)
            await self.assertCanaryWell(canary, port)

        return ensureDeferred(run())

    def test_nesting(self) -> None:
        """
        Nesting past 200 levels is refused, from 201 levels to far past orjson's own limit;
        200 levels are accepted.
        """

        async def run() -> None:
            _, port, canary = await self.serve()
            nester = await self.raw(port)
            for depth in (201, 1025, 100_000):
                nester.send(b'{"type":"ping","id":"n","timestamp":1,"v":' + b"[" * depth + b"]" * depth + b"}", opcode=0x1)
            nester.send(b'{"type":"ping","id":"n","timestamp":1,"v":' + b"[" * 199 + b"]" * 199 + b"}", opcode=0x1)
            await until(lambda: len(nester.frames()) == 4)
            self.assertEqual([json.loads(p)["type"] for _, p in nester.frames()], ["error"] * 3 + ["pong"])
            await self.assertCanaryWell(canary, port)

        return ensureDeferred(run())

    def test_fragmentation(self) -> None:
        """
        A message cut into one-byte fragments with pings between them is reassembled and
        answered; a continuation with no message to continue closes that connection (1002); a
        message never finished holds nothing once its connection is gone.
        """

        async def run() -> None:
            service, port, canary = await self.serve()
            client = await self.raw(port)
            message = binary("ping", {"id": "frag"})
            for i, byte in enumerate(message):
                client.send(bytes((byte,)), opcode=0x2 if i == 0 else 0x0, fin=i == len(message) - 1)
                client.send(b"hi", opcode=0x9)  # control frames may come between fragments
            await until(lambda: any(op == 0x2 for op, _ in client.frames()))
            self.assertEqual([op for op, _ in client.frames()].count(0xA), len(message))
            orphan = await self.raw(port)
            orphan.send(b"x", opcode=0x0)
            await orphan.lost
            self.assertEqual(orphan.close_code(), 1002)
            before = len(service.server.sessions)
            unfinished = await self.raw(port)
            unfinished.send(b"x" * 1_000_000, opcode=0x2, fin=False)
            await until(lambda: len(service.server.sessions) == before + 1)
            unfinished.transport.abortConnection()
            await until(lambda: len(service.server.sessions) == before)
            await self.assertCanaryWell(canary, port)

        return ensureDeferred(run())


class StormTests(HostileCase):
    def test_connection_storm(self) -> None:
        """Forty connections opened and dropped at once, three times: all are forgotten, the canary served."""

        async def run() -> None:
            service, port, canary = await self.serve()
            for _ in range(3):
                clients = [await self.raw(port) for _ in range(40)]
                for c in clients:
                    c.transport.abortConnection()
            await until(lambda: len(service.server.sessions) == 1)
            await self.assertCanaryWell(canary, port)

        return ensureDeferred(run())

    def test_garbage_storm_closes_1008(self) -> None:
        """
        Thousands of one-byte messages get at most max-invalid-messages-per-minute errors, then
        one more error and a close (1008): not one error frame each.
        """

        async def run() -> None:
            _, port, canary = await self.serve(max_invalid_messages_per_minute=100)
            stormer = await self.raw(port)
            stormer.transport.write(client_frame(b"\x00") * 5000)
            await stormer.lost
            self.assertEqual(stormer.errors(), ["Invalid message format"] * 100 + ["Too many invalid messages"])
            self.assertEqual(stormer.close_code(), 1008)
            await self.assertCanaryWell(canary, port)

        return ensureDeferred(run())


class HalfOpenTests(HostileCase):
    def test_half_open_handshakes(self) -> None:
        """
        Connections that send nothing, or half an upgrade request, are closed by the HTTP
        deadlines; one that upgrades but never authenticates (auth required) is closed by
        auth-timeout with 1008, after an error saying why.
        """

        async def run() -> None:
            _, port, canary = await self.serve(
                auth_required=True, auth_timeout=300, http_header_timeout=300, http_idle_timeout=300
            )
            silent = await self.raw(port, handshake=b"")
            half = await self.raw(port, handshake=UPGRADE[:40])
            mute = await self.raw(port)
            for c in (silent, half, mute):
                await c.lost
            self.assertEqual(mute.errors(), ["Authentication timeout"])
            self.assertEqual(mute.close_code(), 1008)
            await self.assertCanaryWell(canary, port)

        return ensureDeferred(run())
