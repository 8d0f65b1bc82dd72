"""
Pub/sub between server instances in one process: the default (a bus of one, so nothing is sent
anywhere) and the reference for the pub/sub contract, where tests put several instances on one
L{LocalBus}.
"""

from __future__ import annotations

import secrets
from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from synckit.pubsub.interface import IPubSub, Receiver, Resync


class LocalBus:
    """
    The shared medium: who watches which document.  Delivery happens on a later reactor turn,
    as it would over a network, never inside the publisher's call.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._watchers: dict[str, set["LocalPubSub"]] = {}

    def watch(self, doc_id: str, endpoint: "LocalPubSub") -> None:
        self._watchers.setdefault(doc_id, set()).add(endpoint)

    def unwatch(self, doc_id: str, endpoint: "LocalPubSub") -> None:
        watchers = self._watchers.get(doc_id)
        if watchers is not None:
            watchers.discard(endpoint)
            if not watchers:
                del self._watchers[doc_id]

    def publish(self, sender: "LocalPubSub", kind: str, doc_id: str, payload: dict[str, Any]) -> None:
        for endpoint in self._watchers.get(doc_id, ()):
            if endpoint is not sender:
                self._clock.callLater(0, endpoint.deliver, kind, doc_id, payload)


@implementer(IPubSub)
class LocalPubSub:
    """A bus never loses publications, so C{resync} is never called."""

    name = "local"

    def __init__(self, bus: LocalBus, instance_id: Optional[str] = None) -> None:
        self.instance_id = instance_id or secrets.token_hex(8)
        self._bus = bus
        self._receiver: Optional[Receiver] = None
        self._watched: set[str] = set()

    def start(self, receiver: Receiver, resync: Resync) -> Deferred:
        self._receiver = receiver
        return succeed(None)

    def ping(self) -> "Deferred[float]":
        return succeed(0.0)

    def stop(self) -> Deferred:
        for doc_id in self._watched:
            self._bus.unwatch(doc_id, self)
        self._watched.clear()
        self._receiver = None
        return succeed(None)

    def watch(self, doc_id: str) -> None:
        self._watched.add(doc_id)
        self._bus.watch(doc_id, self)

    def unwatch(self, doc_id: str) -> None:
        self._watched.discard(doc_id)
        self._bus.unwatch(doc_id, self)

    def publish(self, kind: str, doc_id: str, payload: dict[str, Any]) -> Deferred:
        self._bus.publish(self, kind, doc_id, payload)
        return succeed(None)

    def deliver(self, kind: str, doc_id: str, payload: dict[str, Any]) -> None:
        """Called by the bus with another instance's publication."""
        if self._receiver is not None and doc_id in self._watched:
            self._receiver(kind, doc_id, payload)
