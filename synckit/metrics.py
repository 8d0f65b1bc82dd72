"""
The server's Prometheus metrics, in a registry of their own (several servers can share one
process, as in the tests).

Counting is on the hot path (every message, every broadcast), so it is plain Python here: a
dict entry or an int to add to, a bisect into a histogram's bounds.  prometheus_client's own
counters take a lock on every increment, which the single reactor thread does not need and
which cost about 5% of a busy server's CPU.  Everything is turned into Prometheus metric
families when ``/metrics`` is scraped, together with what is read from the server's state then
(connections, documents, subscribers, reconnects).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from synckit.wire import TYPE_CODES

#: Error codes the server sends in ``error.details.code``; anything else counts as "other".
ERROR_CODES = ("AUTH_REQUIRED", "INVALID_MESSAGE", "RATE_LIMIT_EXCEEDED", "STORAGE_UNAVAILABLE", "TOO_MANY_OPERATIONS")

#: Kinds of operations relayed without being applied on the server.
OPERATION_KINDS = ("counter", "set", "richtext", "text")

_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_FANOUT = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class Counts:
    """A labelled counter: known labels, and "other" for anything else (clients cannot add labels)."""

    def __init__(self, name: str, help: str, label: str, labels: Iterable[str]) -> None:
        self.name, self.help, self.label = name, help, label
        self.values: dict[Any, int] = dict.fromkeys(labels, 0)
        self.values["other"] = 0

    def inc(self, label: Any, amount: int = 1) -> None:
        values = self.values
        if label in values:
            values[label] += amount
        else:
            values["other"] += amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.help, labels=[self.label])
        for label, value in self.values.items():
            family.add_metric([label], value)
        return family


class Histogram:
    """Observations counted into fixed buckets."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self) -> tuple[list[tuple[str, int]], float]:
        cumulative, total = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.buckets):
            total += count
            cumulative.append((bound, total))
        return cumulative, self.sum


class LabelledHistograms:
    """One histogram per label value, made on first use (labels come from our code, never clients)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.by_label: dict[str, Histogram] = {}

    def observe(self, label: str, value: float) -> None:
        histogram = self.by_label.get(label)
        if histogram is None:
            histogram = self.by_label[label] = Histogram(self.bounds)
        histogram.observe(value)


class Metrics:
    def __init__(self) -> None:
        types = list(TYPE_CODES)
        self.received = Counts("synckit_messages_received", "Messages received from clients, by type", "type", types)
        self.sent = Counts(
            "synckit_messages_sent", "Messages sent to clients (a broadcast counts once per recipient), by type", "type", types
        )
        self.errors = Counts("synckit_errors", "error messages sent to clients, by details.code", "code", ERROR_CODES)
        self.operations = Counts(
            "synckit_operations_relayed", "Counter, set, rich-text and legacy text operations relayed, by kind", "kind",
            OPERATION_KINDS,
        )  # fmt: skip
        self.rate_limited = 0
        self.handling = Histogram(_LATENCY)
        self.broadcast_delay = Histogram(_LATENCY)
        self.fanout = Histogram(_FANOUT)
        self.storage_seconds = LabelledHistograms(_LATENCY)
        self.pubsub_seconds = LabelledHistograms(_LATENCY)
        self.registry = CollectorRegistry()

    def storage_call(self, operation: str, seconds: float) -> None:
        self.storage_seconds.observe(operation, seconds)

    def pubsub_call(self, operation: str, seconds: float) -> None:
        self.pubsub_seconds.observe(operation, seconds)

    def watch(self, state: Callable[[], "State"]) -> None:
        """Export these metrics, and what C{state} reads off the server, at each scrape."""
        self.registry.register(_Export(self, state))


class State(NamedTuple):
    """The server's state as a scrape reports it."""

    connections: int
    authenticated: int
    documents: int
    subscriptions: int
    #: backend name -> reconnections so far
    reconnects: dict[str, int]


_HISTOGRAMS = (
    ("handling", "synckit_message_handling_seconds", "From a message's arrival to the end of its handling (its reply sent)"),
    ("broadcast_delay", "synckit_delta_broadcast_delay_seconds", "From a delta's arrival (or another instance's publication of it) to its broadcast"),
    ("fanout", "synckit_broadcast_fanout", "Recipients of each document broadcast"),
)  # fmt: skip
_BY_OPERATION = (
    ("storage_seconds", "synckit_storage_query_seconds", "Storage calls (PostgreSQL round trips), by operation"),
    ("pubsub_seconds", "synckit_pubsub_roundtrip_seconds", "Pub/sub calls (Redis round trips), by operation"),
)


class _Export(Collector):
    def __init__(self, metrics: Metrics, state: Callable[[], State]) -> None:
        self._metrics = metrics
        self._state = state

    def collect(self) -> Iterator[Any]:
        m, state = self._metrics, self._state()
        yield GaugeMetricFamily("synckit_connections", "Open WebSocket connections", value=state.connections)
        yield GaugeMetricFamily(
            "synckit_authenticated_sessions", "Open connections that have authenticated", value=state.authenticated
        )
        yield GaugeMetricFamily("synckit_documents_cached", "Documents held in memory", value=state.documents)
        yield GaugeMetricFamily(
            "synckit_subscribers", "Document subscriptions of open connections", value=state.subscriptions
        )
        reconnects = CounterMetricFamily(
            "synckit_reconnects", "Connections to PostgreSQL or Redis re-established after a loss", labels=["backend"]
        )
        for backend, count in state.reconnects.items():
            reconnects.add_metric([backend], count)
        yield reconnects
        for counts in (m.received, m.sent, m.errors, m.operations):
            yield counts.family()
        yield CounterMetricFamily(
            "synckit_rate_limited", "Messages refused by the per-connection rate limit", value=m.rate_limited
        )
        for attribute, name, help in _HISTOGRAMS:
            buckets, total = getattr(m, attribute).samples()
            yield HistogramMetricFamily(name, help, buckets=buckets, sum_value=total)
        for attribute, name, help in _BY_OPERATION:
            family = HistogramMetricFamily(name, help, labels=["operation"])
            for operation, histogram in getattr(m, attribute).by_label.items():
                buckets, total = histogram.samples()
                family.add_metric([operation], buckets, total)
            yield family
