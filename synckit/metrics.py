"""
The server's Prometheus metrics, in a registry of their own (several servers can share one
process, as in the tests).

Counts of what is happening now (connections, documents, subscribers, reconnects) are read from
the server's state when ``/metrics`` is scraped, not kept up to date on the hot path.  Per-message
counters are bound to their labels once, so counting a message is a dict lookup and an add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from synckit.wire import TYPE_CODES

if TYPE_CHECKING:
    from synckit.server import SyncServer

# The *_created series (a timestamp per labelled child) only double the scrape for our counters.
disable_created_metrics()

#: Error codes the server sends in ``error.details.code``; anything else counts as "other".
ERROR_CODES = ("AUTH_REQUIRED", "INVALID_MESSAGE", "RATE_LIMIT_EXCEEDED", "STORAGE_UNAVAILABLE")

_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_FANOUT = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class _ByLabel:
    """A labelled counter's children, made once; unknown labels share one child."""

    def __init__(self, counter: Counter, labels: Any, other: str = "other") -> None:
        self._children = {label: counter.labels(label) for label in labels}
        self._other = counter.labels(other)

    def inc(self, label: Any, amount: int = 1) -> None:
        self._children.get(label, self._other).inc(amount)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        types = list(TYPE_CODES)
        self.received = _ByLabel(
            Counter("synckit_messages_received", "Messages received from clients, by type", ["type"], registry=r), types
        )
        self.sent = _ByLabel(
            Counter("synckit_messages_sent", "Messages sent to clients (a broadcast counts once per recipient), by type", ["type"], registry=r),
            types,
        )  # fmt: skip
        self.errors = _ByLabel(
            Counter("synckit_errors", "error messages sent to clients, by details.code", ["code"], registry=r), ERROR_CODES
        )
        self.rate_limited = Counter("synckit_rate_limited", "Messages refused by the per-connection rate limit", registry=r)
        self.handling = Histogram(
            "synckit_message_handling_seconds", "From a message's arrival to the end of its handling (its reply sent)",
            registry=r, buckets=_LATENCY,
        )  # fmt: skip
        self.broadcast_delay = Histogram(
            "synckit_delta_broadcast_delay_seconds",
            "From a delta's arrival (or another instance's publication of it) to its broadcast",
            registry=r, buckets=_LATENCY,
        )  # fmt: skip
        self.fanout = Histogram(
            "synckit_broadcast_fanout", "Recipients of each document broadcast", registry=r, buckets=_FANOUT
        )
        self.storage_seconds = Histogram(
            "synckit_storage_query_seconds", "Storage calls (PostgreSQL round trips), by operation",
            ["operation"], registry=r, buckets=_LATENCY,
        )  # fmt: skip
        self.pubsub_seconds = Histogram(
            "synckit_pubsub_roundtrip_seconds", "Pub/sub calls (Redis round trips), by operation",
            ["operation"], registry=r, buckets=_LATENCY,
        )  # fmt: skip

    def storage_call(self, operation: str, seconds: float) -> None:
        self.storage_seconds.labels(operation).observe(seconds)

    def pubsub_call(self, operation: str, seconds: float) -> None:
        self.pubsub_seconds.labels(operation).observe(seconds)

    def watch(self, server: "SyncServer") -> None:
        """Report C{server}'s state at each scrape."""
        self.registry.register(_ServerState(server))


class _ServerState(Collector):
    def __init__(self, server: "SyncServer") -> None:
        self._server = server

    def collect(self) -> Iterator[Any]:
        server = self._server
        sessions = server.sessions
        yield GaugeMetricFamily("synckit_connections", "Open WebSocket connections", value=len(sessions))
        yield GaugeMetricFamily(
            "synckit_authenticated_sessions", "Open connections that have authenticated",
            value=sum(1 for s in sessions if s.authenticated),
        )  # fmt: skip
        yield GaugeMetricFamily("synckit_documents_cached", "Documents held in memory", value=len(server.registry))
        yield GaugeMetricFamily(
            "synckit_subscribers", "Document subscriptions of open connections",
            value=sum(len(s.subscriptions) for s in sessions),
        )  # fmt: skip
        reconnects = CounterMetricFamily(
            "synckit_reconnects", "Connections to PostgreSQL or Redis re-established after a loss", labels=["backend"]
        )
        for backend in (server.storage, server.pubsub):
            reconnects.add_metric([backend.name], getattr(backend, "reconnects", 0))
        yield reconnects
