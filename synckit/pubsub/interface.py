"""
How instances of the server tell each other about writes and presence (docs/architecture.md,
"Other instances").

Each instance publishes what its own clients changed, per document, and merges what the others
publish into its cached documents, then broadcasts it to its own subscribers.  An instance never
receives its own publications (an implementation whose transport echoes them drops them).
Delivery is at most once: storage stays the source of truth.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: (kind, document id, payload): kind is "delta" or "awareness".
Receiver = Callable[[str, str, dict[str, Any]], None]

#: Called after publications may have been missed (a reconnect): re-read what is cached.
Resync = Callable[[], None]

KINDS = ("delta", "awareness")


class PubSubUnavailable(Exception):
    """The pub/sub medium cannot be reached, or did not answer in time."""


class IPubSub(Interface):
    name = Attribute("Short name for logs and /health/ready, e.g. 'redis'.")
    instance_id = Attribute("This instance's id, carried in every publication.")

    def start(receiver: Receiver, resync: Resync) -> Deferred:
        """
        Connect, and from then on hand other instances' publications to C{receiver}.  Call
        C{resync} whenever publications may have been lost (after a reconnect), once watching
        again.
        """

    def ping() -> "Deferred[float]":
        """Round trip to the medium, in seconds; fails if it cannot be reached."""

    def stop() -> Deferred:
        """Disconnect."""

    def watch(doc_id: str) -> None:
        """Receive publications about C{doc_id} (while it is cached here)."""

    def unwatch(doc_id: str) -> None:
        """Stop receiving publications about C{doc_id}."""

    def publish(kind: str, doc_id: str, payload: dict[str, Any]) -> Deferred:
        """Tell the other instances watching C{doc_id}."""
