"""
The scenarios.  Each takes the L{Options} and a L{Connector} and returns its measurements:
latency samples in ms, counts, and the figures it is about (throughput, setup rate, ...).

Deltas set a new field ``f<seq>`` each, so a server that coalesces writes per field still sends
every one; their value starts with the send time (``time.monotonic()``, the same clock in every
process of this machine), so whoever receives a broadcast can time it, in any worker process.
"""

from __future__ import annotations

import math
import random
import string
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Optional, Union

from twisted.internet.defer import Deferred, DeferredList, FirstError, TimeoutError, gatherResults
from twisted.internet.task import deferLater

from synckit import wire
from synckit.bench.client import BenchClient, BenchError, Connector, Refused
from synckit.bench.stats import Replies
from synckit.bench.textstate import Prefill, insert, prefill
from synckit.sync.fugue import FugueText

SCENARIOS = ("roundtrip", "burst", "steady", "fanout", "throughput", "echo", "text")
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
    #: text: characters of the pre-filled document
    chars: int = 10_000
    #: this run's id, the same in every worker: fanout and text write to documents of their own,
    #: so that what an earlier run left there (sent to subscribers as they subscribe) is not
    #: taken for this run's deliveries
    run: str = ""
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
    #: replies (in C{received}) that were errors: writes the server refused
    refused: int = 0
    errors: list[str] = field(default_factory=list)
    connections: int = 0
    elapsed: float = 0.0
    #: text: the canary's ping -> pong round trips, and its pings never answered
    stall_latencies_ms: list[float] = field(default_factory=list)
    stall_missing: int = 0

    def absorb(self, replies: Replies) -> None:
        self.latencies_ms += replies.latencies_ms
        self.received += len(replies.latencies_ms)
        self.missing += replies.missing
        self.out_of_order += replies.out_of_order
        self.refused += replies.refused


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
            self._answered(self._seq_of(reference) if reference is not None else min(self.replies.pending, default=-1))
        elif kind == "error":
            self.replies.unexpected += 1

    def _answered(self, seq: Optional[int]) -> None:
        """Record the reply to C{seq}, and let the next message go if the window was full."""
        if seq is not None and self.replies.received(seq, time.monotonic()) and self._window_open is not None:
            opened, self._window_open = self._window_open, None
            opened.callback(None)

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


#: the first byte of a binary ``delta_batch``
DELTA_BATCH_CODE = bytes([wire.TYPE_CODES["delta_batch"]])
#: seconds between two parses of the text document relayed to the writers of one process
RELAY_PARSE_INTERVAL = 0.05


class TextRelays:
    """
    The text document as the server last relayed it to any writer of this process, for the
    writers to merge.  A server that merges (ours) relays the document's merged state, which
    holds every earlier one, to every writer; the merge is a join, so merging only the newest
    gives the replica that merging each would.  So the newest relay is kept (binary ones as
    bytes, undecoded) and parsed at most every L{RELAY_PARSE_INTERVAL} seconds, one parse for
    all the writers: with a parse per write, 10 writers cost the client as much CPU as their
    merges cost the server.  A writer's state then lacks at most that long of the others' edits,
    about what the SDK's own 50 ms batching of sends adds.
    """

    def __init__(self) -> None:
        self._newest: Union[bytes, dict[str, Any], None] = None
        self._parsed_at = -math.inf
        #: the newest relayed state parsed
        self.state: Optional[FugueText] = None

    def offer(self, payload: bytes, binary: bool) -> bool:
        """A L{BenchClient.on_raw}: keeps a binary ``delta_batch`` (a relay) undecoded."""
        if binary and payload[:1] == DELTA_BATCH_CODE:
            self._newest = payload
            return True
        return False

    def keep(self, relay: dict[str, Any]) -> None:
        """Keep a decoded ``delta_batch`` relay (JSON text frames)."""
        self._newest = relay

    def current(self, now: float) -> Optional[FugueText]:
        """The newest relayed state, parsed again if a newer one came and the last parse is old enough."""
        if self._newest is not None and now - self._parsed_at >= RELAY_PARSE_INTERVAL:
            relay, self._newest = self._newest, None
            self._parsed_at = now
            if isinstance(relay, bytes):
                relay = wire.decode(relay, lambda: "")
            for op in relay.get("deltas") or ():
                if isinstance(op, dict) and op.get("type") == "text-state" and isinstance(op.get("state"), str):
                    self.state = FugueText.parse(op["state"])
        return self.state


class TextWriter(Writer):
    """
    A SyncText client on the text document: each write inserts a few characters at a random
    place of its replica, then sends a ``delta_batch`` of one ``text-state`` op holding the
    replica's whole state, as the SDK does; the C{ack} answers it by message id.  Before each
    insert it merges the L{TextRelays}' state, so that its states grow with everyone's edits as
    an SDK client's do.

    An C{error} reply answers the oldest write still waiting (replies come in order) and counts
    as refused, so that a server refusing text states still gets its replies counted.
    """

    def __init__(
        self, client: BenchClient, name: str, doc_id: str, options: Options, document: Prefill, relays: TextRelays
    ) -> None:
        super().__init__(client, name, doc_id, options)
        self.document = document
        self.relays = relays
        self.replica = FugueText.parse(document.state)
        self.replica.client_id = name
        self._merged: Optional[FugueText] = None
        self._rng = random.Random(name)
        client.on_raw = relays.offer

    def send_one(self) -> None:
        relayed = self.relays.current(time.monotonic())
        if relayed is not None and relayed is not self._merged:
            self.replica.merge(relayed)
            self._merged = relayed
        rng = self._rng
        typed = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 5)))
        insert(self.replica, self.name, typed, *self.document.between(rng.randint(0, len(self.document.order))))
        seq = self.count
        self.count += 1
        batch = text_batch(f"{self.name}-{seq}", self.doc_id, self.name, self.replica.to_json())
        self.replies.sent(seq, time.monotonic())
        self.client.send("delta_batch", batch)

    def _received(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "delta_batch":
            self.relays.keep(message)
        elif kind == "error" and self.replies.pending:
            self.replies.refused += 1
            self._answered(min(self.replies.pending))
        else:
            super()._received(message)


def text_batch(message_id: str, doc_id: str, client_id: str, state: str) -> dict[str, Any]:
    """A ``delta_batch`` carrying a whole text state, as the SDK's SyncText sends it."""
    now_ms = int(time.time() * 1000)
    op = {"type": "text-state", "documentId": doc_id, "state": state, "clientId": client_id, "timestamp": now_ms}
    return {"id": message_id, "documentId": doc_id, "deltas": [op]}


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
    doc_id = f"{options.doc_prefix}-fanout-{options.run}"
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


#: seconds between the text scenario's canary pings
CANARY_INTERVAL = 0.005


async def text(reactor: Any, connector: Connector, options: Options) -> Result:
    """
    Text merge under load: C{clients} L{TextWriter}s on one SyncText document pre-filled with
    about C{chars} characters, C{window} writes in flight each.  Every write is a merge on the
    server, so acked writes a second are merges a second; the state each carries grows by a
    block a write, so later merges cost more.  Meanwhile (worker 0) a canary connection pings
    every L{CANARY_INTERVAL} seconds: its longest round trips are the server's longest stalls.

    The reference server (0.3.0) knows no ``delta_batch`` (type code 0x50): it answers each write
    with C{error} "Invalid message format", which the writers count as refused and time as the
    write's reply, and it stores and relays nothing, so its writers' states grow only by their own
    inserts.  (It reads binary frames only: with C{--text} it refuses even C{auth}.)
    """
    doc_id = f"{options.doc_prefix}-text-{options.run}"
    document = prefill(options.chars)
    names = [f"text-{i}" for i in share(options.clients, options)]
    clients = await _sessions(connector, names, lambda _: doc_id)
    if clients:
        await fill_text(reactor, clients[0], names[0], doc_id, document.state, options)
    relays = TextRelays()
    writers: list[Writer] = [TextWriter(c, n, doc_id, options, document, relays) for c, n in zip(clients, names)]
    canary = None
    if options.worker == 0:
        [canary_client] = await _sessions(connector, ["text-canary"], lambda _: None)
        clients.append(canary_client)
        pings = replace(options, ping=True, rate=1 / CANARY_INTERVAL, pattern="fixed")
        canary = Writer(canary_client, "text-canary", doc_id, pings)
    return await _write(reactor, writers, clients, options, canary)


async def fill_text(reactor: Any, client: BenchClient, name: str, doc_id: str, state: str, options: Options) -> None:
    """
    Write the pre-filled document's state, and wait for its C{ack}.  A server that refuses text
    states (the reference), or ignores them, does the same to every write, which the writers
    count; so the run goes on.
    """
    message_id = f"{name}-fill"
    try:
        await client.request(
            "delta_batch", text_batch(message_id, doc_id, name, state),
            lambda m: m.get("type") == "ack" and m.get("messageId") == message_id, options.timeout, reactor,
        )  # fmt: skip
    except (Refused, TimeoutError):
        pass


async def _write(
    reactor: Any, writers: list[Writer], clients: list[BenchClient], options: Options, canary: Optional[Writer] = None
) -> Result:
    """
    Every writer sends for the duration, then waits for its last replies; their results
    together.  A C{canary}, if any, pings meanwhile: its round trips are the stall samples.
    """
    everyone = writers + ([canary] if canary is not None else [])
    started = time.monotonic()
    await _gather([w.run(reactor, started + options.duration) for w in everyone])
    await _gather([w.drain(reactor) for w in everyone])
    result = Result(connections=len(clients), elapsed=time.monotonic() - started)
    for writer in writers:
        result.sent += writer.count
        result.absorb(writer.replies)
    if canary is not None:
        result.stall_latencies_ms, result.stall_missing = canary.replies.latencies_ms, canary.replies.missing
    await _close(clients)
    return result


RUN: dict[str, Callable[[Any, Connector, Options], Awaitable[Result]]] = {
    "roundtrip": roundtrip, "burst": burst, "steady": steady, "fanout": fanout, "throughput": throughput, "echo": echo,
    "text": text,
}  # fmt: skip


def connector_for(reactor: Any, options: Options) -> Connector:
    if options.scenario == "echo":
        return Connector(reactor, options.url, raw=True, timeout=options.timeout)
    return Connector(reactor, options.url, text=options.text, token=options.token, timeout=options.timeout)


async def run(reactor: Any, options: Options) -> Result:
    if options.scenario not in RUN:
        raise BenchError(f"no scenario {options.scenario!r} (choose from {', '.join(SCENARIOS)})")
    return await RUN[options.scenario](reactor, connector_for(reactor, options), options)
