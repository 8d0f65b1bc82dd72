"""
Pub/sub between instances over Redis (txredisapi), for running several instances behind a load
balancer (PROTOCOL.md section 7.6).

Each document has two channels, ``<prefix>delta:<id>`` and ``<prefix>awareness:<id>``; an
instance subscribes to them while it watches the document.  A publication is a CBOR map
``{"i": <instance id>, "p": <payload>}``: Redis sends it to the publisher's own subscriber too,
and the instance id lets it drop its echoes.

Two connections, as Redis requires: one publishes and pings, one subscribes.  Both reconnect
by themselves with back-off.  The subscriber subscribes again to every watched channel each time
it connects (txredisapi does not restore subscriptions), and after a reconnect asks the server
to resync, since publications sent meanwhile are lost.  Calls fail with L{PubSubUnavailable} while
Redis is down, or after the timeout if it does not answer.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable, Optional
from urllib.parse import unquote, urlsplit

import cbor2
import txredisapi
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from synckit.pubsub.interface import KINDS, IPubSub, PubSubUnavailable, Receiver, Resync


class RedisAddress:
    """The parts of a ``redis://[[user]:password@]host[:port][/db]`` URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"not a redis:// URL: {self.describe(url)}")
        self.host = parts.hostname
        self.port = parts.port or 6379
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        self.db = int(path) if path else None

    @staticmethod
    def describe(url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or 6379}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class _Subscriber(txredisapi.SubscriberProtocol):
    """Subscribes to the owner's watched channels whenever it connects, and hands it what arrives."""

    owner: "RedisPubSub"

    def connectionMade(self) -> Deferred:
        d = super().connectionMade()  # AUTH first; whenConnected fires after it
        self.whenConnected().addCallback(lambda _: self.owner._subscriber_ready(self))
        return d

    def connectionLost(self, why: Failure) -> None:
        self.owner._subscriber_lost(self)
        super().connectionLost(why)

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.owner._message(channel, message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _Subscriber

    def __init__(self, owner: "RedisPubSub") -> None:
        super().__init__(isLazy=True)
        self.owner = owner

    def buildProtocol(self, addr: Any) -> _Subscriber:
        subscriber = super().buildProtocol(addr)
        subscriber.owner = self.owner
        return subscriber


@implementer(IPubSub)
class RedisPubSub:
    name = "redis"
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        prefix: str = "synckit:",
        instance_id: Optional[str] = None,
        timeout: float = 5.0,
        observe: Optional[Callable[[str, float], None]] = None,
    ) -> None:
        """
        @param observe: called with (operation, seconds) after each publish or ping that Redis
            answered, for the metrics.
        """
        self._observe = observe
        self.instance_id = instance_id or secrets.token_hex(8)
        #: how many times the subscriber connection came back after losing Redis
        self.reconnects = 0
        self._reactor = reactor
        self._address = RedisAddress(url)
        self._prefix = prefix
        self._timeout = timeout
        self._watched: set[str] = set()
        self._receiver: Optional[Receiver] = None
        self._resync: Optional[Resync] = None
        self._subscriber: Optional[_Subscriber] = None
        self._ever_subscribed = False
        self._publisher = self._factory(txredisapi.RedisFactory(None, self._address.db, 1, isLazy=True))
        self._subscribers = self._factory(_SubscriberFactory(self))

    def _factory(self, factory: txredisapi.RedisFactory) -> txredisapi.RedisFactory:
        # Raw bytes in and out: CBOR is binary, and text that looks like a number must stay text.
        factory.charset = None
        factory.convertNumbers = False
        factory.username = self._address.username
        factory.password = self._address.password
        factory.replyTimeout = self._timeout
        factory.initialDelay = 0.5
        factory.maxDelay = 5
        return factory

    def channel(self, kind: str, doc_id: str) -> str:
        return f"{self._prefix}{kind}:{doc_id}"

    # Lifecycle

    async def _start(self) -> None:
        for factory in (self._publisher, self._subscribers):
            factory.startConnecting(HostnameEndpoint(self._reactor, self._address.host, self._address.port, timeout=self._timeout))
        # Both factories keep retrying in the background; what fails here is the wait.
        both = DeferredList([self._publisher.deferred, self._subscribers.deferred], fireOnOneErrback=True, consumeErrors=True)
        try:
            await both.addTimeout(self._timeout, self._reactor)
        except Exception:
            await self._disconnect()
            raise PubSubUnavailable(f"cannot reach Redis at {self._address} within {self._timeout:g} s") from None

    def start(self, receiver: Receiver, resync: Resync) -> Deferred:
        self._receiver = receiver
        self._resync = resync
        return Deferred.fromCoroutine(self._start())

    async def _disconnect(self) -> None:
        await DeferredList([self._publisher.disconnect(), self._subscribers.disconnect()], consumeErrors=True)
        # txredisapi hands connections over one reactor turn late (callLater(0)): let that land.
        await deferLater(self._reactor, 0, lambda: None)

    def stop(self) -> Deferred:
        self._receiver = None
        self._resync = None
        return Deferred.fromCoroutine(self._disconnect())

    # Subscriptions

    def _subscriber_ready(self, subscriber: _Subscriber) -> None:
        self._subscriber = subscriber
        if self._ever_subscribed:
            self.reconnects += 1
            self._log.info("Redis at {address} is back; subscribing again", address=str(self._address))
        channels = [self.channel(kind, doc_id) for doc_id in self._watched for kind in KINDS]
        d = subscriber.subscribe(channels) if channels else succeed(None)
        if self._ever_subscribed:
            d.addCallback(lambda _: self._resync and self._resync())
        d.addErrback(lambda f: self._log.warn("subscribing again failed: {error}", error=f.getErrorMessage()))
        self._ever_subscribed = True

    def _subscriber_lost(self, subscriber: _Subscriber) -> None:
        if self._subscriber is subscriber:
            self._subscriber = None
            if self._receiver is not None:
                self._log.warn("lost Redis at {address}; reconnecting", address=str(self._address))

    def watch(self, doc_id: str) -> None:
        self._watched.add(doc_id)
        self._send_subscription("subscribe", doc_id)

    def unwatch(self, doc_id: str) -> None:
        self._watched.discard(doc_id)
        self._send_subscription("unsubscribe", doc_id)

    def _send_subscription(self, command: str, doc_id: str) -> None:
        """Tell the live subscriber connection; if there is none, connecting will catch up."""
        if self._subscriber is None:
            return
        d = getattr(self._subscriber, command)([self.channel(kind, doc_id) for kind in KINDS])
        d.addErrback(lambda f: self._log.warn("{command} {doc} failed: {error}", command=command, doc=doc_id, error=f.getErrorMessage()))

    def _message(self, channel: bytes, data: bytes) -> None:
        try:
            kind, doc_id = channel.decode("utf-8")[len(self._prefix):].split(":", 1)
            envelope = cbor2.loads(data)
            sender, payload = envelope["i"], envelope["p"]
            if kind not in KINDS or not isinstance(payload, dict):
                raise ValueError(f"unexpected {kind!r} publication")
        except Exception as e:
            self._log.warn("dropped a malformed publication on {channel!r}: {error}", channel=channel, error=str(e))
            return
        if sender != self.instance_id and self._receiver is not None and doc_id in self._watched:
            self._receiver(kind, doc_id, payload)

    # Calls

    def _within(self, d: Deferred, what: str) -> Deferred:
        """C{d} within the timeout; its round trip is observed when it succeeds."""
        if self._observe is not None:
            started = time.perf_counter()
            observe = self._observe
            d.addCallback(lambda result: (observe(what, time.perf_counter() - started), result)[1])
        return d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=lambda *_: self._late(what))

    def _late(self, what: str) -> None:
        raise PubSubUnavailable(f"Redis at {self._address} did not answer {what} within {self._timeout:g} s")

    def _connection(self) -> Any:
        if not self._publisher.size:
            raise PubSubUnavailable(f"Redis at {self._address} is not connected")
        return self._publisher.handler

    def publish(self, kind: str, doc_id: str, payload: dict[str, Any]) -> Deferred:
        data = cbor2.dumps({"i": self.instance_id, "p": payload})
        try:
            connection = self._connection()
        except PubSubUnavailable:
            return fail()
        return self._within(connection.publish(self.channel(kind, doc_id), data), "publish").addErrback(self._lost)

    def _lost(self, failure: Failure) -> None:
        """A call cut off by a lost connection: Redis is unavailable, as for one never made."""
        failure.trap(txredisapi.ConnectionError)
        raise PubSubUnavailable(f"Redis at {self._address} is not connected: {failure.getErrorMessage()}")

    async def _ping(self) -> float:
        started = time.perf_counter()
        await self._within(self._connection().ping(), "ping")
        return time.perf_counter() - started

    def ping(self) -> "Deferred[float]":
        return Deferred.fromCoroutine(self._ping())
