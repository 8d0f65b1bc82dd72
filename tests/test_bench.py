"""
synckit-bench: its arithmetic, its reports, and short runs of every scenario against the real
service on a real port (and of the command itself, in a subprocess).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile
from dataclasses import replace

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase

from synckit import wire
from synckit.bench import report
from synckit.bench.client import BenchError, Connector
from synckit.bench.scenarios import RELAY_PARSE_INTERVAL, Options, Pacer, Result, TextRelays, TextWriter, run, text_batch
from synckit.bench.stats import Replies, summary
from synckit.bench.textstate import insert, prefill, state_json
from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.storage.memory import MemoryStorage
from synckit.sync.fugue import FugueText
from tests.services import free_port
from tests.wsclient import ServiceCase

ROOT = os.path.join(os.path.dirname(__file__), "..")


class StatsTests(SynchronousTestCase):
    def test_summary(self) -> None:
        """Nearest-rank percentiles, min, max and mean of a known sample."""
        s = summary([float(i) for i in range(1, 101)])
        self.assertEqual(
            (s["count"], s["min"], s["max"], s["mean"], s["p50"], s["p90"], s["p99"]), (100, 1, 100, 50.5, 50, 90, 99)
        )
        self.assertIsNone(summary([])["p50"])

    def test_replies(self) -> None:
        """Replies are matched by sequence number; overtaking, unknown and missing ones are counted."""
        r = Replies()
        for seq in range(4):
            r.sent(seq, 10.0)
        self.assertTrue(r.received(1, 10.002))
        self.assertTrue(r.received(0, 10.003))  # overtaken by 1
        self.assertFalse(r.received(0, 10.004))  # a duplicate
        self.assertEqual((r.out_of_order, r.unexpected, r.missing), (1, 1, 2))
        self.assertEqual([round(x, 6) for x in r.latencies_ms], [2.0, 3.0])

    def test_pacer(self) -> None:
        """fixed: rate a second; burst: whole bursts; ramp: linear up to rate, then rate."""
        base = Options("throughput", "ws://x/ws", rate=100)
        self.assertEqual(Pacer(base).due(1.0), 101)
        self.assertEqual(Pacer(replace(base, pattern="burst", burst_size=50)).due(0.6), 100)
        ramp = Pacer(replace(base, pattern="ramp", ramp=2.0))
        self.assertEqual((ramp.due(1.0), ramp.due(2.0), ramp.due(3.0)), (25, 100, 200))


#: What SyncKit's core (its WebAssembly build) wrote for "hello world" typed by client "a", then
#: "XY" typed at position 5: the insert is a block of its own, its origins the two characters
#: either side.
CORE_INSERT = (
    '{"blocks":[[{"client_id":"a","clock":11,"offset":0},{"id":{"client_id":"a","clock":11,"offset":0},'
    '"text":"hello world","left_origin":null,"right_origin":null,"deleted":false}],'
    '[{"client_id":"a","clock":13,"offset":0},{"id":{"client_id":"a","clock":13,"offset":0},"text":"XY",'
    '"left_origin":{"client_id":"a","clock":5,"offset":0},"right_origin":{"client_id":"a","clock":6,"offset":0},'
    '"deleted":false}]],"clock":{"value":13},"client_id":"a"}'
)


class TextStateTests(SynchronousTestCase):
    def test_insert_is_the_cores(self) -> None:
        """A local insert leaves the replica in the state the core's own insert writes, byte for byte."""
        replica = FugueText.parse(state_json("a", [(11, "a", "hello world", None, None)]))
        insert(replica, "a", "XY", (5, "a"), (6, "a"))
        self.assertEqual(replica.to_json(), CORE_INSERT)

    def test_prefill(self) -> None:
        """
        The pre-filled document has about the characters asked for, its character ids in text
        order, and is the same in every process (so every worker can build it).
        """
        document = prefill(1000)
        text = FugueText.parse(document.state).text()
        self.assertEqual(len(text), len(document.order))
        self.assertGreaterEqual(len(text), 1000)
        self.assertLess(len(text), 1080)
        self.assertEqual(len(set(document.order)), len(document.order))
        self.assertEqual(prefill(1000), document)
        self.assertEqual(document.between(0), (None, document.order[0]))
        self.assertEqual(document.between(len(text)), (document.order[-1], None))

    def test_insert_at_either_end(self) -> None:
        """An insert between the neighbours L{Prefill.between} gives shows where it was typed."""
        document = prefill(300)
        replica = FugueText.parse(document.state)
        shown = replica.text()
        insert(replica, "w", "AB", *document.between(0))
        insert(replica, "w", "YZ", *document.between(len(document.order)))
        self.assertEqual(replica.text(), "AB" + shown + "YZ")
        self.assertEqual(replica.clock, len(document.order) + 4)


def blocks_of(state: FugueText, client_id: str) -> list[dict]:
    """The blocks C{client_id} typed, as the state's JSON has them."""
    return [block for _, block in json.loads(state.to_json())["blocks"] if block["id"]["client_id"] == client_id]


def relay(state: str) -> bytes:
    """A ``delta_batch`` relay of a text state, as the server sends it in a binary frame."""
    return wire.Frame("delta_batch", 0, text_batch("r-1", "room:t", "server", state)).encoded(True)


class FakeClient:
    """What a writer uses of a connection: C{send}, and the two hooks it sets."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.on_message = lambda message: None
        self.on_raw = None

    def send(self, kind: str, payload: dict) -> None:
        self.sent.append((kind, payload))


class TextWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.document = prefill(200)
        self.client = FakeClient()
        self.relays = TextRelays()
        self.writer = TextWriter(self.client, "text-0", "room:t", Options("text", "ws://x/ws"), self.document, self.relays)

    def state_sent(self, index: int) -> FugueText:
        kind, payload = self.client.sent[index]
        self.assertEqual(kind, "delta_batch")
        [op] = payload["deltas"]
        self.assertEqual((op["type"], op["documentId"], op["clientId"]), ("text-state", "room:t", "text-0"))
        return FugueText.parse(op["state"])

    def test_each_write_is_the_whole_state_with_one_insert_more(self) -> None:
        """Every write carries the pre-filled document and all of this writer's inserts so far."""
        for _ in range(3):
            self.writer.send_one()
        first, third = self.state_sent(0), self.state_sent(2)
        self.assertEqual(first.client_id, "text-0")
        self.assertEqual((len(blocks_of(first, "text-0")), len(blocks_of(third, "text-0"))), (1, 3))
        self.assertFalse(first.copy().merge(FugueText.parse(self.document.state)))  # it holds the document
        self.assertFalse(third.merge(first))  # and the later state holds the earlier one
        typed = sum(len(b["text"]) for b in blocks_of(third, "text-0"))
        self.assertEqual(len(third.text()), len(self.document.order) + typed)

    def test_acks_and_refusals(self) -> None:
        """An ack answers its write by message id; an error answers the oldest write, as refused."""
        self.writer.send_one()
        self.client.on_message({"type": "error", "error": "Invalid message format"})
        self.writer.send_one()
        self.client.on_message({"type": "ack", "messageId": "text-0-1"})
        replies = self.writer.replies
        self.assertEqual((len(replies.latencies_ms), replies.refused, replies.missing, replies.unexpected), (2, 1, 0, 0))

    def test_merges_the_newest_relay(self) -> None:
        """
        The next write holds the newest relay (which holds the ones before it).  Binary relays
        are taken undecoded; other messages are left to be decoded.
        """
        other = FugueText.parse(self.document.state)
        insert(other, "text-9", "zzz", None, None)
        older = other.to_json()
        insert(other, "text-9", "qqq", None, None)
        self.assertTrue(self.client.on_raw(relay(older), True))
        self.assertTrue(self.client.on_raw(relay(other.to_json()), True))
        self.assertFalse(self.client.on_raw(wire.Frame("ack", 0, {"messageId": "text-0-0"}).encoded(True), True))
        self.writer.send_one()
        self.assertFalse(self.state_sent(0).merge(other))

    def test_parses_at_most_once_an_interval(self) -> None:
        """A relay newer than the last parse waits for the interval to pass; then it is the one parsed."""
        replica = FugueText.parse(self.document.state)
        self.relays.offer(relay(replica.to_json()), True)
        first = self.relays.current(100.0)
        insert(replica, "text-9", "zzz", None, None)
        self.relays.offer(relay(replica.to_json()), True)
        self.assertIs(self.relays.current(100.0 + RELAY_PARSE_INTERVAL / 2), first)
        later = self.relays.current(100.0 + RELAY_PARSE_INTERVAL * 2)
        self.assertIsNot(later, first)
        self.assertEqual(later.to_json(), replica.to_json())


class ReportTests(SynchronousTestCase):
    def report(self, name: str, throughput: int, p50: float) -> dict:
        moment = datetime.datetime(2026, 11, 23, 4, 15, tzinfo=datetime.timezone.utc)
        result = Result(latencies_ms=[p50] * 10, sent=throughput, received=throughput, elapsed=1.0, connections=1)
        return report.build(
            Options("fanout", "ws://h/ws", token="secret"), result, {"name": name, "version": "1"}, moment, moment,
            [{"t": 1.0, "cpu_pct": 50.0, "rss_kb": 2048}], 1,
        )  # fmt: skip

    def test_shape_and_name(self) -> None:
        r = self.report("SyncKit Server", 1000, 2.0)
        self.assertEqual(set(r), {"metadata", "client", "config", "throughput", "latency_ms", "errors", "resources"})
        self.assertEqual(r["metadata"]["started_at"], "2026-11-23T04:15:00.000+00:00")
        self.assertEqual(r["latency_ms"]["p50"], 2.0)
        self.assertNotIn("token", r["config"])
        self.assertEqual(report.file_name(r), "fanout-synckit-server-20261123T041500Z.json")

    def test_compare(self) -> None:
        table = report.compare(self.report("ours", 2000, 1.0), self.report("theirs", 1000, 4.0))
        self.assertIn("| throughput msgs/s | 2000.0 | 1000.0 | 2.00x |", table)
        self.assertIn("| latency p50 ms | 1.0 | 4.0 | 0.25x |", table)
        self.assertIn("| server RSS MiB (peak) | 2.0 | 2.0 | 1.00x |", table)
        self.assertNotIn("stall", table)  # no canary in this scenario

    def text_report(self, name: str, stalls: list[float], refused: int) -> dict:
        moment = datetime.datetime(2026, 11, 23, 4, 15, tzinfo=datetime.timezone.utc)
        result = Result(
            latencies_ms=[5.0] * 10, sent=10, received=10, refused=refused, elapsed=1.0, connections=11,
            stall_latencies_ms=stalls, stall_missing=2,
        )  # fmt: skip
        return report.build(Options("text", "ws://h/ws"), result, {"name": name}, moment, moment, [], 1)

    def test_text_stalls(self) -> None:
        """The text scenario reports the canary's round trips, its stalls side by side in compare."""
        ours = self.text_report("ours", [float(i) for i in range(1, 101)], 0)
        self.assertEqual(
            ours["canary"],
            {"interval_ms": 5.0, "pings": 102, "unanswered": 2, "p50_ms": 50, "stall_p99_ms": 99, "stall_max_ms": 100},
        )
        theirs = self.text_report("theirs", [2.0, 4.0], 10)
        self.assertEqual(theirs["errors"]["refused"], 10)
        table = report.compare(ours, theirs)
        self.assertIn("| stall p99 ms (canary) | 99.0 | 4.0 | 24.75x |", table)
        self.assertIn("| stall max ms (canary) | 100.0 | 4.0 | 25.00x |", table)
        self.assertIn("| refused | 0 | 10 | 0.00x |", table)


class ScenarioTests(ServiceCase):
    async def options(self, scenario: str, **overrides) -> Options:
        _, port = await self.started(echo_endpoint=True)
        path = "echo" if scenario == "echo" else "ws"
        values = dict(duration=0.3, drain=1.0, clients=3, window=2, subscribers=3, messages=20, ramp=0.1, timeout=2.0)
        values.update(overrides)
        return Options(scenario, f"ws://127.0.0.1:{port}/{path}", **values)

    async def check(self, scenario: str, **overrides) -> Result:
        result = await run(reactor, await self.options(scenario, **overrides))
        self.assertEqual((result.errors, result.missing, result.out_of_order), ([], 0, 0))
        self.assertGreater(result.received, 0)
        self.assertEqual(len(result.latencies_ms), result.received)
        return result

    async def test_roundtrip(self) -> None:
        result = await self.check("roundtrip")
        self.assertEqual((result.sent, result.received), (20, 20))

    async def test_roundtrip_on_a_filled_document(self) -> None:
        """--fields fills the document first (several messages' worth), then each delta adds one field."""
        service, port = await self.started()
        options = Options("roundtrip", f"ws://127.0.0.1:{port}/ws", messages=5, fields=1200, duration=5.0, timeout=5.0)
        result = await run(reactor, options)
        self.assertEqual((result.errors, result.missing, result.received), ([], 0, 5))
        stored = await service.storage.load("room:bench-rt")
        self.assertEqual(len(stored.fields), 1205)

    async def test_fanout_across_instances(self) -> None:
        """With --peer-url, subscribers alternate between two instances, and each gets every delta."""
        storage, bus = MemoryStorage(), LocalBus(reactor)
        ports = []
        for _ in range(2):
            _, port = await self.started(storage=storage, pubsub=LocalPubSub(bus))
            ports.append(port)
        options = Options(
            "fanout", f"ws://127.0.0.1:{ports[0]}/ws", peer_url=f"ws://127.0.0.1:{ports[1]}/ws",
            subscribers=4, rate=50.0, duration=0.4, drain=1.0, timeout=2.0,
        )  # fmt: skip
        result = await run(reactor, options)
        self.assertEqual(result.errors, [])
        self.assertGreater(result.received, 0)
        self.assertEqual(result.received, result.sent)
        self.assertEqual(len(result.peer_latencies_ms), result.received // 2)
        built = report.build(options, result, {"name": "synckit"}, *[datetime.datetime.now(datetime.timezone.utc)] * 2, [], 1)
        self.assertEqual(built["latency_peer_ms"]["count"], result.received // 2)

    async def test_roundtrip_ping_in_json(self) -> None:
        await self.check("roundtrip", ping=True, text=True)

    async def test_burst(self) -> None:
        result = await self.check("burst", clients=5)
        self.assertEqual(result.connections, 5)

    async def test_steady(self) -> None:
        await self.check("steady", clients=4, rate=20.0, duration=0.4)

    async def test_fanout(self) -> None:
        result = await self.check("fanout", rate=50.0, duration=0.4)
        self.assertEqual(result.received, result.sent)  # every delta reached every subscriber

    async def test_fanout_again_on_the_same_server(self) -> None:
        """
        A second run counts only its own deliveries: what the first left on the server reaches
        the new subscribers as they subscribe, and is not this run's.
        """
        options = await self.options("fanout", rate=50.0)
        for run_id, duration in (("first", 0.8), ("second", 0.2)):  # the first writes more fields
            result = await run(reactor, replace(options, run=run_id, duration=duration))
            self.assertEqual((result.errors, result.received), ([], result.sent))

    async def test_throughput_paced_in_bursts(self) -> None:
        await self.check("throughput", rate=40.0, pattern="burst", burst_size=5)

    async def test_echo(self) -> None:
        await self.check("echo")

    async def test_text(self) -> None:
        """
        Every write is acknowledged and merged: the stored text holds the pre-filled document and
        one block per write; the canary's pings are answered meanwhile.
        """
        service, port = await self.started()
        options = Options(
            "text", f"ws://127.0.0.1:{port}/ws", clients=3, window=1, chars=300, duration=0.3, drain=1.0, run="t"
        )
        result = await run(reactor, options)
        self.assertEqual((result.errors, result.missing, result.refused), ([], 0, 0))
        self.assertGreater(result.received, 0)
        self.assertGreater(len(result.stall_latencies_ms), 0)
        self.assertEqual(result.stall_missing, 0)
        stored = (await service.storage.load("room:bench-text-t")).text.state
        self.assertEqual(sum(len(blocks_of(stored, f"text-{i}")) for i in range(3)), result.received)
        self.assertFalse(stored.copy().merge(FugueText.parse(prefill(300).state)))

    async def test_connections_do_not_wait_for_delayed_acks(self) -> None:
        """
        Bench connections set TCP_NODELAY (Autobahn's own attempt fails silently), so that a
        small message is never held back until the server acknowledges the previous one.
        """
        _, port = await self.started()
        client = await Connector(reactor, f"ws://127.0.0.1:{port}/ws").open()
        self.addCleanup(client.dropConnection, abort=True)
        self.assertTrue(client.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def test_unreachable(self) -> None:
        with self.assertRaises(BenchError) as caught:
            await run(reactor, Options("roundtrip", f"ws://127.0.0.1:{free_port()}/ws"))
        self.assertIn("cannot connect to ws://127.0.0.1:", str(caught.exception))

    async def test_not_a_synckit_server(self) -> None:
        """An endpoint that never answers auth (here, the echo) fails clearly, not by hanging."""
        options = await self.options("roundtrip")
        with self.assertRaises(BenchError) as caught:
            await run(reactor, replace(options, url=options.url.replace("/ws", "/echo"), timeout=0.5))
        self.assertIn("no auth_success", str(caught.exception))

    async def test_echo_is_off_by_default(self) -> None:
        _, port = await self.started()
        with self.assertRaises(BenchError):
            await run(reactor, Options("echo", f"ws://127.0.0.1:{port}/echo", duration=0.1))


class CommandTests(ServiceCase):
    async def bench(self, *args: str) -> tuple[str, str, int]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "synckit.bench.cli", *args], env=os.environ, path=ROOT, reactor=reactor
        )
        return out.decode(), err.decode(), code

    async def test_report_and_compare(self) -> None:
        """Two worker processes run the scenario; the report lands in --output-dir; compare reads two."""
        service, port = await self.started()
        folder = tempfile.mkdtemp()
        self.addCleanup(lambda: [os.remove(os.path.join(folder, f)) for f in os.listdir(folder)] and os.rmdir(folder))
        args = ["throughput", "--url", f"ws://127.0.0.1:{port}/ws", "--clients", "4", "--duration", "0.5",
                "--drain", "1", "--processes", "2", "--server-pid", str(os.getpid()), "--output-dir", folder]  # fmt: skip
        out, err, code = await self.bench(*args)
        self.assertEqual(code, 0, err)
        [name] = os.listdir(folder)
        self.assertTrue(name.startswith("throughput-synckit-server-"))
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            written = json.load(f)
        self.assertEqual((written["client"]["processes"], written["throughput"]["connections"]), (2, 4))
        self.assertEqual(written["metadata"]["server"]["version"], "0.1.0")
        self.assertGreater(written["latency_ms"]["count"], 0)
        self.assertGreater(len(written["resources"]), 0)
        out, err, code = await self.bench("compare", os.path.join(folder, name), os.path.join(folder, name))
        self.assertEqual(code, 0, err)
        self.assertIn("| throughput msgs/s |", out)

    async def test_unreachable_exits_2(self) -> None:
        out, err, code = await self.bench("roundtrip", "--url", f"ws://127.0.0.1:{free_port()}/ws")
        self.assertEqual(code, 2)
        self.assertIn("synckit-bench: cannot connect to", err)
        self.assertNotIn("Traceback", err)
