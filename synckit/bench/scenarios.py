"""
The scenarios.  Each takes the L{Options} and a L{Connector} and returns its measurements:
latency samples in ms, counts, and the figures it is about (throughput, setup rate, ...).

Deltas set a new field ``f<seq>`` each, so a server that coalesces writes per field still sends
every one; their value starts with the send time (``time.monotonic()``, the same clock in every
process of this machine), so whoever receives a broadcast can time it, in any worker process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Optional

from twisted.internet.defer import Deferred, DeferredList, FirstError, TimeoutError, gatherResults
from twisted.internet.task import deferLater

from synckit.bench.client import BenchClient, BenchError, Connector
from synckit.bench.stats import Replies

SCENARIOS = ("roundtrip", "burst", "steady", "fanout", "throughput", "echo")
PATTERNS = ("fixed", "burst", "ramp")


@dataclass
class Options:
    scenario: str
    url: str
    clients: int = 50
    window: int = 10
    subscribers: int = 10
    messages: int = 2000
    rate: float = 0.0
    pattern: str = "fixed"
    burst_size: int = 50
    ramp: float = 5.0
    duration: float = 10.0
    drain: float = 5.0
    #: seconds to wait for each reply while setting a connection up
    timeout: float = 15.0
    value_bytes: int = 32
    text: bool = False
    ping: bool = False
    doc_prefix: str = "room:bench"
    token: Optional[str] = None
    #: roundtrip: fields written to the document before measuring (it then grows from there)
    fields: int = 0
    #: fanout: a second instance of the server; subscribers alternate between it and C{url}
    peer_url: Optional[str] = None
    #: this worker's share, when several processes run one scenario
    worker: int = 0
    workers: int = 1


@dataclass
class Result:
    latencies_ms: list[float] = field(default_factory=list)
    #: fanout with a peer: the latencies of the deliveries to the peer's subscribers (also in C{latencies_ms})
    peer_latencies_ms: list[float] = field(default_factory=list)
    sent: int = 0
    received: int = 0
    missing: int = 0
    out_of_order: int = 0
    errors: list[str] = field(default_factory=list)
    connections: int = 0
    elapsed: float = 0.0

    def absorb(self, replies: Replies) -> None:
        self.latencies_ms += replies.latencies_ms
        self.received += len(replies.latencies_ms)
        self.missing += replies.missing
        self.out_of_order += replies.out_of_order


class Pacer:
    """
    When the next message is due, for a rate pattern: C{fixed} (C{rate} a second), C{burst}
    (C{burst_size} at once, as often as makes C{rate} a second), C{ramp} (from 0 up to C{rate}
    over C{ramp} seconds, then steady).  A rate of 0 means no pacing: as fast as the window allows.
    """

    def __init__(self, options: Options) -> None:
        self.options = options

    def due(self, elapsed: float) -> int:
        """How many messages should have been sent C{elapsed} seconds in."""
        o = self.options
        if o.pattern == "burst":
            period = o.burst_size / o.rate
            return (int(elapsed / period) + 1) * o.burst_size
        if o.pattern == "ramp" and elapsed < o.ramp:
            return int(o.rate * elapsed * elapsed / (2 * o.ramp))
        if o.pattern == "ramp":
            return int(o.rate * (o.ramp / 2 + elapsed - o.ramp))
        return int(o.rate * elapsed) + 1


def value(options: Options) -> str:
    """A delta value: the send time, padded to the configured size."""
    return f"{time.monotonic():.6f}".ljust(options.value_bytes, "x")


def sent_at(value: Any) -> Optional[float]:
    try:
        return float(str(value)[:17].rstrip("x"))
    except ValueError:
        return None


def share(total: int, options: Options) -> range:
    """This worker's part of C{range(total)}."""
    return range(options.worker, total, options.workers)


async def sleep(reactor: Any, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class Writer:
    """
    One connection sending deltas to one document, each acknowledged by message id: closed loop
    with up to C{window} unacknowledged (rate 0), or paced by a L{Pacer}.
    """

    def __init__(self, client: BenchClient, name: str, doc_id: str, options: Options) -> None:
        self.client = client
        self.name = name
        self.doc_id = doc_id
        self.options = options
        self.replies = Replies()
        #: messages sent so far (the next one's sequence number)
        self.count = 0
        self._stopped = False
        self._window_open: Optional[Deferred] = None
        client.on_message = self._received

    def send_one(self) -> None:
        seq = self.count
        self.count += 1
        kind = "ping" if self.options.ping else "delta"
        payload: dict[str, Any] = {"id": f"{self.name}-{seq}"}
        if not self.options.ping:
            payload.update(documentId=self.doc_id, delta={f"f{seq}": value(self.options)}, vectorClock={}, clientId=self.name)
        self.replies.sent(seq, time.monotonic())
        self.client.send(kind, payload)

    def _received(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "ack" or (kind == "pong" and self.options.ping):
            reference = message.get("messageId", "") if kind == "ack" else None
            seq = self._seq_of(reference) if reference is not None else min(self.replies.pending, default=-1)
            if seq is not None and self.replies.received(seq, time.monotonic()) and self._window_open is not None:
                opened, self._window_open = self._window_open, None
                opened.callback(None)
        elif kind == "error":
            self.replies.unexpected += 1

    def _seq_of(self, message_id: str) -> Optional[int]:
        prefix, _, seq = str(message_id).rpartition("-")
        return int(seq) if prefix == self.name and seq.isdigit() else None

    async def run(self, reactor: Any, until: float, count: Optional[int] = None) -> None:
        """Send until the monotonic time C{until} (or C{count} messages), then stop."""
        options = self.options
        pacer = Pacer(options) if options.rate > 0 else None
        started = time.monotonic()
        while not self._stopped:
            now = time.monotonic()
            if now >= until or (count is not None and self.count >= count):
                break
            if pacer is not None:
                target = pacer.due(now - started)
                while self.count < target:
                    self.send_one()
                await sleep(reactor, min(0.005, until - now))
            elif len(self.replies.pending) < options.window:
                self.send_one()
            else:
                self._window_open = Deferred()
                try:
                    await self._window_open.addTimeout(options.drain, reactor)
                except TimeoutError:
                    break  # no reply for the whole drain time: what is pending counts as missing

    async def drain(self, reactor: Any) -> None:
        """Wait up to the drain time for the replies still outstanding."""
        deadline = time.monotonic() + self.options.drain
        while self.replies.pending and time.monotonic() < deadline:
            await sleep(reactor, 0.01)


async def _gather(coroutines: list[Any]) -> list[Any]:
    """Run concurrently; the first failure is raised as itself (not wrapped in FirstError)."""
    try:
        return list(await gatherResults([Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True))
    except FirstError as e:
        e.subFailure.raiseException()
        raise


async def _sessions(connector: Connector, names: list[str], doc_of: Callable[[str], Optional[str]]) -> list[BenchClient]:
    return await _gather([connector.session(n, doc_of(n)) for n in names])


async def _close(clients: list[BenchClient]) -> None:
    for client in clients:
        client.sendClose()
    await DeferredList([c.closed for c in clients])


#: fields per message while pre-filling a document (within both servers' per-message limits)
FILL_CHUNK = 500


async def fill(reactor: Any, client: BenchClient, name: str, doc_id: str, options: Options) -> None:
    """Write C{options.fields} fields ``p<i>`` to C{doc_id}, a message of L{FILL_CHUNK} at a time, each acknowledged."""
    for start in range(0, options.fields, FILL_CHUNK):
        message_id = f"{name}-fill-{start}"
        delta = {f"p{i}": value(options) for i in range(start, min(start + FILL_CHUNK, options.fields))}
        await client.request(
            "delta", {"id": message_id, "documentId": doc_id, "delta": delta, "vectorClock": {}, "clientId": name},
            lambda m: m.get("type") == "ack" and m.get("messageId") == message_id, options.timeout * 4, reactor,
        )  # fmt: skip


async def roundtrip(reactor: Any, connector: Connector, options: Options) -> Result:
    """
    One client, one message at a time: delta -> ack (or ping -> pong with --ping), each delta a
    new field of one document, which C{--fields} fills first: the round trip on a large document.
    """
    [client] = await _sessions(connector, ["rt-0"], lambda _: f"{options.doc_prefix}-rt")
    if options.fields and not options.ping:
        await fill(reactor, client, "rt-0", f"{options.doc_prefix}-rt", options)
    writer = Writer(client, "rt-0", f"{options.doc_prefix}-rt", replace(options, window=1, rate=0))
    started = time.monotonic()
    await writer.run(reactor, started + options.duration, count=options.messages)
    await writer.drain(reactor)
    result = Result(sent=writer.count, connections=1, elapsed=time.monotonic() - started)
    result.absorb(writer.replies)
    await _close([client])
    return result


async def burst(reactor: Any, connector: Connector, options: Options) -> Result:
    """C{clients} connections opened at once: each one's connect + auth + subscribe time."""
    result = Result()

    async def one(i: int) -> None:
        started = time.monotonic()
        try:
            client = await connector.session(f"burst-{i}", f"{options.doc_prefix}-{i % 100}")
        except Exception as e:
            result.errors.append(str(e))
            return
        result.latencies_ms.append((time.monotonic() - started) * 1000)
        clients.append(client)

    clients: list[BenchClient] = []
    started = time.monotonic()
    await DeferredList([Deferred.fromCoroutine(one(i)) for i in share(options.clients, options)])
    result.elapsed = time.monotonic() - started
    result.connections = result.received = len(clients)
    result.sent = len(share(options.clients, options))
    result.missing = result.sent - result.received
    await _close(clients)
    return result


async def steady(reactor: Any, connector: Connector, options: Options) -> Result:
    """
    C{clients} connections opened over the ramp time and held, each sending deltas at C{rate}
    a second (default 1) for the duration: latency under a realistic idle-heavy load.
    """
    mine = list(share(options.clients, options))
    clients: list[BenchClient] = []
    gap = options.ramp / max(1, len(mine))
    for i in mine:
        clients.append(await connector.session(f"steady-{i}", f"{options.doc_prefix}-{i % 100}"))
        await sleep(reactor, gap)
    paced = replace(options, rate=options.rate or 1.0)
    writers = [Writer(c, f"steady-{i}", f"{options.doc_prefix}-{i % 100}", paced) for c, i in zip(clients, mine)]
    return await _write(reactor, writers, clients, options)


async def throughput(reactor: Any, connector: Connector, options: Options) -> Result:
    """C{clients} writers, each on its own document, C{window} deltas in flight (or paced)."""
    mine = list(share(options.clients, options))
    clients = await _sessions(connector, [f"tp-{i}" for i in mine], lambda n: f"{options.doc_prefix}-{n}")
    writers = [Writer(c, f"tp-{i}", f"{options.doc_prefix}-tp-{i}", options) for c, i in zip(clients, mine)]
    return await _write(reactor, writers, clients, options)


async def fanout(reactor: Any, connector: Connector, options: Options) -> Result:
    """
    One writer and C{subscribers} subscribers on one document: the time from the writer's send
    to each subscriber's receipt; C{received} counts deliveries.  Worker 0 runs the writer, on
    C{url}; with a C{peer_url} every other subscriber is on that instance, so that half the
    deliveries cross between instances (through Redis, or whatever the servers share).
    """
    doc_id = f"{options.doc_prefix}-fanout"
    result = Result()
    seen: set[tuple[int, str]] = set()

    def deliveries(client: BenchClient, i: int) -> None:
        def received(message: dict[str, Any]) -> None:
            if message.get("type") != "delta" or not str(message.get("field", "")).startswith("f"):
                return
            at = sent_at(message.get("value"))
            if at is None or (i, message["field"]) in seen:
                return
            seen.add((i, message["field"]))
            latency = (time.monotonic() - at) * 1000
            result.latencies_ms.append(latency)
            if options.peer_url and i % 2:
                result.peer_latencies_ms.append(latency)
            result.received += 1

        client.on_message = received

    mine = list(share(options.subscribers, options))
    connectors = [connector]
    if options.peer_url:
        peer = Connector(connector.reactor, options.peer_url, options.text, token=options.token, timeout=options.timeout)
        connectors.append(peer)
    subscribers = await _gather([connectors[i % len(connectors)].session(f"sub-{i}", doc_id) for i in mine])
    for client, i in zip(subscribers, mine):
        deliveries(client, i)
    clients = list(subscribers)
    started = time.monotonic()
    if options.worker == 0:
        [writer_client] = await _sessions(connector, ["fanout-writer"], lambda _: doc_id)
        clients.append(writer_client)
        writer = Writer(writer_client, "fanout-writer", doc_id, options)
        await sleep(reactor, 0.5)  # the other workers' subscribers settle in
        started = time.monotonic()
        await writer.run(reactor, started + options.duration)
        await writer.drain(reactor)
        result.sent = writer.count * options.subscribers  # deliveries expected, over all workers
    else:
        await sleep(reactor, 0.5 + options.duration)
    await sleep(reactor, min(options.drain, 1.0))
    result.elapsed = time.monotonic() - started
    result.connections = len(clients)
    await _close(clients)
    return result


async def echo(reactor: Any, connector: Connector, options: Options) -> Result:
    """C{clients} connections to a plain echo endpoint, C{window} messages in flight each."""
    mine = list(share(options.clients, options))
    result = Result()
    clients = await _gather([connector.open() for _ in mine])
    started = time.monotonic()
    until = started + options.duration
    finished: list[Deferred] = []

    def run(client: BenchClient) -> Deferred:
        replies = Replies()
        done: Deferred = Deferred()
        counter = [0]

        def send() -> None:
            seq = counter[0]
            counter[0] += 1
            replies.sent(seq, time.monotonic())
            client.sendMessage(f"{seq}:".encode().ljust(options.value_bytes, b"x"), True)

        def received(payload: bytes) -> None:
            seq = payload.split(b":", 1)[0]
            if seq.isdigit():
                replies.received(int(seq), time.monotonic())
            if time.monotonic() < until:
                send()
            elif not replies.pending and not done.called:
                done.callback(replies)

        client.on_message = received
        for _ in range(options.window):
            send()
        return done.addTimeout(options.duration + options.drain, reactor).addErrback(lambda _: replies)

    finished = [run(c) for c in clients]
    for replies in await gatherResults(finished):
        result.sent += len(replies.latencies_ms) + replies.missing
        result.absorb(replies)
    result.elapsed = time.monotonic() - started
    result.connections = len(clients)
    await _close(clients)
    return result


async def _write(reactor: Any, writers: list[Writer], clients: list[BenchClient], options: Options) -> Result:
    """Every writer sends for the duration, then waits for its last replies; their results together."""
    started = time.monotonic()
    await _gather([w.run(reactor, started + options.duration) for w in writers])
    await _gather([w.drain(reactor) for w in writers])
    result = Result(connections=len(clients), elapsed=time.monotonic() - started)
    for writer in writers:
        result.sent += writer.count
        result.absorb(writer.replies)
    await _close(clients)
    return result


RUN: dict[str, Callable[[Any, Connector, Options], Awaitable[Result]]] = {
    "roundtrip": roundtrip, "burst": burst, "steady": steady, "fanout": fanout, "throughput": throughput, "echo": echo,
}  # fmt: skip


def connector_for(reactor: Any, options: Options) -> Connector:
    if options.scenario == "echo":
        return Connector(reactor, options.url, raw=True, timeout=options.timeout)
    return Connector(reactor, options.url, text=options.text, token=options.token, timeout=options.timeout)


async def run(reactor: Any, options: Options) -> Result:
    if options.scenario not in RUN:
        raise BenchError(f"no scenario {options.scenario!r} (choose from {', '.join(SCENARIOS)})")
    return await RUN[options.scenario](reactor, connector_for(reactor, options), options)
