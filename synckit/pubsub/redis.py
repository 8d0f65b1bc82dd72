"""
Pub/sub between instances over Redis (txredisapi), for running several instances behind a load
balancer (docs/architecture.md, "Other instances"; docs/operations.md for running it).

Each document has two channels, ``<prefix>delta:<id>`` and ``<prefix>awareness:<id>``; an
instance subscribes to them while it watches the document.  A publication is a CBOR map
``{"i": <instance id>, "p": <payload>}``: Redis sends it to the publisher's own subscriber too,
and the instance id lets it drop its echoes.

Two connections, as Redis requires: one publishes and pings, one subscribes.  Both reconnect
by themselves with back-off.  The subscriber subscribes again to every watched channel each time
it connects (txredisapi does not restore subscriptions), and after a reconnect asks the server
to resync, since publications sent meanwhile are lost.  Calls fail with L{PubSubUnavailable} while
Redis is down, or after the timeout (L{synckit.timeouts.within}) if it does not answer; a
connection that does not answer in time is dropped, and made again, as one that Redis closed.

Each connection's protocol tells this module when it is ready and when it is lost, and commands
go straight to it: txredisapi's pool (its handler, size and queue of connections) is not used.
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
from synckit.timeouts import within


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


class _Publisher(txredisapi.RedisProtocol):
    """The connection that publishes and pings: the owner holds it while it is ready."""

    owner: "RedisPubSub"

    def connectionMade(self) -> Deferred:
        d = super().connectionMade()  # AUTH and SELECT first; whenConnected fires after them
        self.whenConnected().addCallback(self.owner._publisher_ready)
        return d

    def connectionLost(self, why: Failure) -> None:
        self.owner._publisher_lost(self)
        super().connectionLost(why)


class _Subscriber(txredisapi.SubscriberProtocol):
    """Subscribes to the owner's watched channels whenever it connects, and hands it what arrives."""

    owner: "RedisPubSub"

    def connectionMade(self) -> Deferred:
        d = super().connectionMade()  # AUTH first; whenConnected fires after it
        self.whenConnected().addCallback(self.owner._subscriber_ready)
        return d

    def connectionLost(self, why: Failure) -> None:
        self.owner._subscriber_lost(self)
        super().connectionLost(why)

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.owner._message(channel, message)


class _Factory(txredisapi.RedisFactory):
    """
    One reconnecting connection of C{protocol}, handing its owner to each protocol it builds.
    Raw bytes in and out: CBOR is binary, and text that looks like a number must stay text.
    No reply timeout of its own: every call is made L{within} the owner's.
    """

    initialDelay = 0.5
    maxDelay = 5

    def __init__(self, owner: "RedisPubSub", protocol: type, address: "RedisAddress", db: Optional[int]) -> None:
        super().__init__(
            None, db, 1, isLazy=True, charset=None, password=address.password, convertNumbers=False,
            username=address.username,
        )  # fmt: skip
        self.protocol = protocol
        self.owner = owner

    def buildProtocol(self, addr: Any) -> Any:
        connection = super().buildProtocol(addr)
        connection.owner = self.owner
        return connection


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
        #: the ready connections, or C{None} while each is down
        self._publisher: Optional[_Publisher] = None
        self._subscriber: Optional[_Subscriber] = None
        self._ever_subscribed = False
        # Subscriptions do not depend on the database: the subscriber selects none.
        self._factories = (
            _Factory(self, _Publisher, self._address, self._address.db),
            _Factory(self, _Subscriber, self._address, None),
        )

    def channel(self, kind: str, doc_id: str) -> str:
        return f"{self._prefix}{kind}:{doc_id}"

    # Lifecycle

    async def _start(self) -> None:
        for factory in self._factories:
            factory.startConnecting(HostnameEndpoint(self._reactor, self._address.host, self._address.port, timeout=self._timeout))
        # Both factories keep retrying in the background; what fails here is the wait.  A
        # factory's deferred fires once its connection is ready, and fails at once if Redis
        # refuses the password or the database.
        both = DeferredList([factory.deferred for factory in self._factories], fireOnOneErrback=True, consumeErrors=True)
        try:
            await within(both, self._timeout, self._reactor)
        except Exception:
            await self._disconnect()
            raise PubSubUnavailable(f"cannot reach Redis at {self._address} within {self._timeout:g} s") from None

    def start(self, receiver: Receiver, resync: Resync) -> Deferred:
        self._receiver = receiver
        self._resync = resync
        return Deferred.fromCoroutine(self._start())

    async def _disconnect(self) -> None:
        await DeferredList([factory.disconnect() for factory in self._factories], consumeErrors=True)
        # txredisapi hands connections over one reactor turn late (callLater(0)): let that land.
        await deferLater(self._reactor, 0, lambda: None)

    def stop(self) -> Deferred:
        self._receiver = None
        self._resync = None
        return Deferred.fromCoroutine(self._disconnect())

    # Connections

    def _publisher_ready(self, publisher: _Publisher) -> None:
        self._publisher = publisher

    def _publisher_lost(self, publisher: _Publisher) -> None:
        if self._publisher is publisher:
            self._publisher = None

    # Subscriptions

    def _subscriber_ready(self, subscriber: _Subscriber) -> None:
        self._subscriber = subscriber
        if self._ever_subscribed:
            self.reconnects += 1
            self._log.info("Redis at {address} is back; subscribing again", address=str(self._address))
        channels = [self.channel(kind, doc_id) for doc_id in self._watched for kind in KINDS]
        d = self._call(subscriber, "subscribe", lambda: subscriber.subscribe(channels)) if channels else succeed(None)
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
        subscriber = self._subscriber
        if subscriber is None:
            return
        channels = [self.channel(kind, doc_id) for kind in KINDS]
        d = self._call(subscriber, command, lambda: getattr(subscriber, command)(channels))
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

    def _call(self, connection: Any, what: str, command: Callable[[], Deferred], observed: bool = False) -> Deferred:
        """
        C{command} on C{connection}, within the timeout; if C{observed}, its round trip goes to
        the metrics when it succeeds.  Redis answers a connection's commands in order, so one
        that goes unanswered holds up everything behind it: at the timeout the connection is
        dropped, which fails what it still owes and makes it again (the subscriber then
        subscribes again and asks for a resync).
        """
        started = time.perf_counter()
        try:
            d = command()
        except txredisapi.ConnectionError:
            return fail().addErrback(self._lost)

        def late(settled: Deferred) -> PubSubUnavailable:
            connection.transport.abortConnection()
            return PubSubUnavailable(f"Redis at {self._address} did not answer {what} within {self._timeout:g} s")

        if observed and self._observe is not None:
            observe = self._observe
            d.addCallback(lambda result: (observe(what, time.perf_counter() - started), result)[1])
        return within(d, self._timeout, self._reactor, late).addErrback(self._lost)

    def _lost(self, failure: Failure) -> None:
        """A call cut off by a lost connection: Redis is unavailable, as for one never made."""
        failure.trap(txredisapi.ConnectionError)
        raise PubSubUnavailable(f"Redis at {self._address} is not connected: {failure.getErrorMessage()}")

    def _connected(self) -> _Publisher:
        if self._publisher is None:
            raise PubSubUnavailable(f"Redis at {self._address} is not connected")
        return self._publisher

    def publish(self, kind: str, doc_id: str, payload: dict[str, Any]) -> Deferred:
        data = cbor2.dumps({"i": self.instance_id, "p": payload})
        try:
            publisher = self._connected()
        except PubSubUnavailable:
            return fail()
        return self._call(publisher, "publish", lambda: publisher.publish(self.channel(kind, doc_id), data), observed=True)

    async def _ping(self) -> float:
        started = time.perf_counter()
        publisher = self._connected()
        await self._call(publisher, "ping", publisher.ping, observed=True)
        return time.perf_counter() - started

    def ping(self) -> "Deferred[float]":
        return Deferred.fromCoroutine(self._ping())
