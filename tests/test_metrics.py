"""
The Prometheus metrics: counted by the domain (through the harness, no network), and served at
``/metrics`` on the main port or on a listener of their own (a real scrape over HTTP).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.web.client import Agent, readBody

from tests.helpers import HarnessCase
from tests.wsclient import ServiceCase


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def scraped(text: str, name: str, **labels: str) -> float:
    """A sample's value in the Prometheus text format (0 if absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


class DomainMetricsTests(HarnessCase):
    def test_a_scripted_session(self) -> None:
        """Connect, subscribe, write, broadcast, disconnect: each shows up where it should."""
        h = self.harness()
        r = h.server.metrics.registry
        alice, _ = h.connect()
        bob, _ = h.connect("192.0.2.2")
        self.assertEqual((value(r, "synckit_connections"), value(r, "synckit_authenticated_sessions")), (2, 2))
        for session in (alice, bob):
            h.send(session, "subscribe", {"documentId": "d"})
        h.send(alice, "delta", {"documentId": "d", "delta": {"a": 1, "b": 2}, "vectorClock": {}})
        h.flush()
        self.assertEqual(value(r, "synckit_messages_received_total", type="subscribe"), 2)
        self.assertEqual(value(r, "synckit_messages_received_total", type="delta"), 1)
        self.assertEqual(value(r, "synckit_messages_sent_total", type="ack"), 1)
        self.assertEqual(value(r, "synckit_messages_sent_total", type="delta"), 4)  # 2 fields x 2 subscribers
        self.assertEqual(value(r, "synckit_broadcast_fanout_count"), 1)
        self.assertEqual(value(r, "synckit_broadcast_fanout_sum"), 2)
        self.assertEqual(value(r, "synckit_delta_broadcast_delay_seconds_count"), 1)
        self.assertEqual(value(r, "synckit_message_handling_seconds_count"), 3)
        self.assertEqual((value(r, "synckit_documents_cached"), value(r, "synckit_subscribers")), (1, 2))
        alice.closed()
        bob.closed()
        self.assertEqual((value(r, "synckit_connections"), value(r, "synckit_subscribers")), (0, 0))

    def test_errors_by_code_and_rate_limit(self) -> None:
        h = self.harness(max_messages_per_minute=1)
        r = h.server.metrics.registry
        session, _ = h.connect()
        h.send(session, "subscribe", {"documentId": "bad id!"})  # refused with an error that has no code
        h.send(session, "ping")  # over the limit of one a minute
        self.assertEqual(value(r, "synckit_rate_limited_total"), 1)
        self.assertEqual(value(r, "synckit_errors_total", code="RATE_LIMIT_EXCEEDED"), 1)
        session.receive(b"\x00garbage", True)  # undecodable: also no code
        self.assertEqual(value(r, "synckit_errors_total", code="other"), 2)

    def test_unknown_types_share_one_label(self) -> None:
        """A client cannot grow the metrics: unknown or non-string types count as "other"."""
        h = self.harness()
        r = h.server.metrics.registry
        session, _ = h.connect()
        session.receive(b'{"type": "no-such-type", "id": "1", "timestamp": 1}', False)
        session.receive(b'{"type": ["x"], "id": "2", "timestamp": 1}', False)
        self.assertEqual(value(r, "synckit_messages_received_total", type="other"), 2)

    def test_reconnects_and_backend_calls(self) -> None:
        h = self.harness()
        metrics = h.server.metrics
        metrics.storage_call("save", 0.002)
        metrics.storage_call("save", 0.2)
        metrics.pubsub_call("publish", 0.001)
        r = metrics.registry
        self.assertEqual(value(r, "synckit_storage_query_seconds_count", operation="save"), 2)
        self.assertEqual(value(r, "synckit_storage_query_seconds_bucket", operation="save", le="0.0025"), 1)
        self.assertEqual(value(r, "synckit_storage_query_seconds_bucket", operation="save", le="+Inf"), 2)
        self.assertEqual(value(r, "synckit_pubsub_roundtrip_seconds_count", operation="publish"), 1)
        self.assertEqual(value(r, "synckit_reconnects_total", backend="memory"), 0)

    def test_registries_are_per_server(self) -> None:
        """Two servers in one process count separately."""
        first, second = self.harness(), self.harness()
        session, _ = first.connect()
        first.send(session, "ping")
        self.assertEqual(value(first.server.metrics.registry, "synckit_messages_received_total", type="ping"), 1)
        self.assertEqual(value(second.server.metrics.registry, "synckit_messages_received_total", type="ping"), 0)


class ScrapeTests(ServiceCase):
    async def scrape(self, port: int) -> tuple[int, str]:
        response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        return response.code, (await readBody(response)).decode()

    async def test_scrape_follows_a_session(self) -> None:
        _, port = await self.started()
        code, before = await self.scrape(port)
        self.assertEqual((code, scraped(before, "synckit_connections")), (200, 0))
        client = await self.client(port)
        client.send("subscribe", {"id": "s", "documentId": "doc"})
        await client.wait_type("sync_response")
        client.send("delta", {"id": "w", "documentId": "doc", "delta": {"k": 1}, "vectorClock": {}})
        await client.wait_type("ack")
        await client.wait_type("delta")
        _, during = await self.scrape(port)
        self.assertEqual(scraped(during, "synckit_connections"), 1)
        self.assertEqual(scraped(during, "synckit_subscribers"), 1)
        self.assertEqual(scraped(during, "synckit_messages_received_total", type="delta"), 1)
        self.assertEqual(scraped(during, "synckit_broadcast_fanout_count"), 1)
        self.assertGreater(scraped(during, "synckit_message_handling_seconds_count"), 0)
        client.sendClose()
        await client.closed
        _, after = await self.scrape(port)
        self.assertEqual(scraped(after, "synckit_connections"), 0)
        self.assertEqual(scraped(after, "synckit_documents_cached"), 1)

    async def test_separate_listener(self) -> None:
        """With metrics-port, /metrics is served there, and only there."""
        service, port = await self.started(metrics_port=0)
        self.assertEqual((await self.scrape(port))[0], 404)
        code, text = await self.scrape(service.ports[-1].getHost().port)
        self.assertEqual(code, 200)
        self.assertIn("synckit_connections", text)
