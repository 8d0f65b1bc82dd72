"""
The root service: storage, then pub/sub, then the listeners, started in that order once the
reactor runs, and stopped in reverse.  Stopping sends what is pending, closes every WebSocket with
1001, waits (briefly) for the clients to acknowledge, and lets running handlers finish before
storage closes.

Each listener is a child service on a Twisted endpoint (``--listen``: TCP, TLS, a unix socket, a
socket systemd passed; or ``--port``/``--host`` as TCP), all serving the one protocol factory,
and the metrics listener another.  They listen only once storage and pub/sub are up, since a
connection accepted earlier could not be served.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Any, Optional

from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from synckit.config import Config, ConfigError, listen_endpoints, metrics_endpoints
from synckit.pubsub.interface import IPubSub, PubSubUnavailable
from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.server import SyncServer
from synckit.storage.interface import Cleaned, IStorage, StorageUnavailable
from synckit.storage.schema import SchemaError
from synckit.storage.memory import MemoryStorage
from synckit.metrics import Metrics
from synckit.web import make_listener, metrics_site

#: how long shutdown waits for clients to answer the close handshake.
CLOSE_GRACE = 2.0
#: the longest pause between housekeeping rounds (chunk expiry, presence refresh and expiry).
HOUSEKEEPING_INTERVAL = 30.0


def housekeeping_interval(config: Config) -> float:
    """
    Seconds between housekeeping rounds: often enough that presence is refreshed on the other
    instances well within the presence timeout, however short it is set.
    """
    return min(HOUSEKEEPING_INTERVAL, config.awareness_timeout / 4000)


def server_endpoint(reactor: Any, description: str, origin: str) -> IStreamServerEndpoint:
    """
    The endpoint C{description} names, as Twisted (and its plugins) parse it; a string it cannot
    parse raises L{ConfigError} naming C{origin}, the settings it came from.
    """
    try:
        return serverFromString(reactor, description)
    except Exception as e:
        if description.startswith("systemd:") and isinstance(e, (IndexError, KeyError)):
            # Twisted looks the socket up in what systemd passed, and says only which index.
            reason = "systemd passed no such socket (see LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID)"
        else:
            reason = str(e) or type(e).__name__
        raise ConfigError(f"{origin}: cannot listen on {description!r}: {reason}") from None


def _origins(config: Config) -> tuple[str, str]:
    """Where the main and the metrics endpoint strings came from, for messages."""
    main = "--listen (SYNCKIT_LISTEN)" if config.listen else "--port/--host (PORT, HOST)"
    metrics = "--metrics-listen (SYNCKIT_METRICS_LISTEN)" if config.metrics_listen else "--metrics-port/--metrics-host"
    return main, metrics


def check_endpoints(config: Config, reactor: Any) -> None:
    """
    Parse every endpoint C{config} names, with the reactor that will serve them, so that a bad
    one stops twistd, naming the setting, before anything starts: an ``ssl:`` endpoint reads its
    key and certificate here, a ``systemd:`` one finds the socket systemd passed.
    """
    main, metrics = _origins(config)
    for description, _ in listen_endpoints(config):
        server_endpoint(reactor, description, main)
    for description in metrics_endpoints(config):
        server_endpoint(reactor, description, metrics)


def describe(address: IAddress) -> str:
    """An address as a log line shows it."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return f"{address.host} port {address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name.decode("utf-8", "replace") if isinstance(address.name, bytes) else address.name
        return f"unix socket {name}"
    return str(address)


@implementer(IStreamServerEndpoint)
class _Reporting:
    """
    An endpoint that reports the outcome of listening to C{outcome}: the port, or the reason it
    cannot listen.  StreamServerEndpointService only logs that reason, and carries on.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, outcome: "Deferred[IListeningPort]") -> None:
        self._endpoint = endpoint
        self._outcome = outcome

    def listen(self, factory: Factory) -> "Deferred[Optional[IListeningPort]]":
        return self._endpoint.listen(factory).addBoth(self._report)

    def _report(self, result: Any) -> Optional[IListeningPort]:
        if isinstance(result, Failure):
            self._outcome.errback(result)
            return None  # reported, and by the root service: not again by the listener
        self._outcome.callback(result)
        return result


class Listener(StreamServerEndpointService):
    """
    One endpoint served, a child of the root service, which starts it once the backends are up.
    C{listening} fires with the port, or fails with the reason it cannot listen: a server that
    cannot listen where it was told to must not run.  C{optional}: that failure is only a
    warning (the IPv6 loopback, for ``localhost``, on a machine without IPv6).
    """

    def __init__(self, description: str, endpoint: IStreamServerEndpoint, factory: Factory, optional: bool = False) -> None:
        self.description = description
        self.optional = optional
        self.listening: Deferred[IListeningPort] = Deferred()
        super().__init__(_Reporting(endpoint, self.listening), factory)

    def stopService(self) -> "Deferred[None]":
        # The root stops its listeners before closing connections, then all its children; and it
        # may stop before it ever started them.  Only a started listener has a port to close.
        if not self.running:
            return succeed(None)
        return super().stopService()


def exit_zero_on_signals(reactor: Any) -> None:
    """
    Make SIGTERM and SIGINT stop the reactor like any shutdown, so that after the graceful stop
    (1001 closes, pending broadcasts sent) twistd exits 0.  Twisted's own handlers record the
    signal and re-raise it once the reactor has stopped, so the process would die by the signal
    (exit 143) however cleanly it shut down.  Called once the reactor runs, after Twisted has
    installed its handlers.
    """

    def stop(signum: int, frame: Any) -> None:
        reactor.callFromThread(_stop_for_signal, reactor, signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


#: the collector's thresholds for a running server: a young collection every 50,000 new objects
#: rather than 700, and the older generations examined more rarely in proportion
GC_THRESHOLDS = (50_000, 50, 100)


def tune_garbage_collection() -> None:
    """
    Collect cycles less often than CPython's defaults, and never look again at what start-up
    made.  A connection's set-up makes a few hundred objects (Autobahn's protocol, Twisted's
    transport, the session), so at the default threshold of 700 a reconnect storm triggers a
    young collection every few connections and, with thousands connected, full collections
    that walk every connection's objects: 12% of the CPU of setting up 3,000 connections, and
    their p99 went from 27 to 75 ms.  synckit leaves no cycles on the hot paths (a closed
    connection's memory comes back without the collector), so collecting less often costs little
    memory.  Called once, at the end of start-up, by the daemon (not by tests).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def exit_one_if_start_fails(service: "SyncKitService", reactor: Any) -> None:
    """
    When start-up fails (say, PostgreSQL cannot be reached), stop and exit 1, so that a
    supervisor sees the failure and restarts us.  twistd itself has no exit status to give: once
    the reactor has shut down cleanly, the process ends here, after flushing its output.
    """

    def failed(failure: Failure) -> None:
        reactor.addSystemEventTrigger("after", "shutdown", _exit_now, 1)
        if reactor.running:
            reactor.stop()

    service.started.addErrback(failed)


def _exit_now(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _stop_for_signal(reactor: Any, name: str) -> None:
    SyncKitService._log.info("received {signal}, shutting down", signal=name)
    if reactor.running:
        reactor.stop()


def build(config: Config, reactor: Any) -> "SyncKitService":
    """
    The service C{config} describes: PostgreSQL storage when a database is configured (else
    memory), Redis pub/sub when configured (else a bus of one), each timing its calls into the
    metrics.
    """
    metrics = Metrics()
    timeout = config.backend_timeout / 1000
    storage: IStorage = MemoryStorage()
    if config.database:
        from synckit.storage.postgres import PostgresStorage

        storage = PostgresStorage(
            reactor, config.database, config.database_pool_size, timeout, config.auto_migrate, metrics.storage_call
        )
    pubsub: IPubSub = LocalPubSub(LocalBus(reactor))
    if config.redis:
        from synckit.pubsub.redis import RedisPubSub

        pubsub = RedisPubSub(reactor, config.redis, config.redis_prefix, timeout=timeout, observe=metrics.pubsub_call)
    return SyncKitService(config, reactor, storage, pubsub, metrics)


class SyncKitService(MultiService):
    _log = Logger()

    def __init__(
        self, config: Config, reactor: Any, storage: IStorage, pubsub: IPubSub, metrics: Optional[Metrics] = None
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.storage = storage
        self.pubsub = pubsub
        self.server = SyncServer(config, reactor, storage, pubsub, metrics)
        self.listener = make_listener(self.server, config)
        main_origin, metrics_origin = _origins(config)
        self.listeners = [
            Listener(description, server_endpoint(reactor, description, main_origin), self.listener, optional)
            for description, optional in listen_endpoints(config)
        ]
        self.metrics_listeners: list[Listener] = []
        if metrics_endpoints(config):
            site = metrics_site(self.server.metrics, self.server)
            self.metrics_listeners = [
                Listener(description, server_endpoint(reactor, description, metrics_origin), site)
                for description in metrics_endpoints(config)
            ]
        for listener in self.listeners + self.metrics_listeners:
            listener.setServiceParent(self)
        #: what the listeners listen on once started: the main ones, then the metrics ones
        self.ports: list[IListeningPort] = []
        self._housekeeping = LoopingCall(self.server.housekeeping)
        self._housekeeping.clock = reactor
        #: the retention cleanup (docs/data-lifecycle.md): a child from storage's start to its stop
        self.retention = TimerService(config.cleanup_interval, self.cleanup)
        self.retention.clock = reactor
        #: brings documents.state (what the reference reads) up to date with the writes saved
        #: since: a child from storage's start to its stop, as the retention is
        self.state_sync = TimerService(config.state_sync_interval, self.sync_state)
        self.state_sync.clock = reactor
        #: fires once every listener listens, or fails if start-up failed.
        self.started: Deferred = Deferred()

    def privilegedStartService(self) -> None:
        # Not the children's: a listener would listen there, before the backends are up.
        Service.privilegedStartService(self)

    def startService(self) -> None:
        # The children start in _start, once the backends are up.
        Service.startService(self)
        self._reactor.callWhenRunning(self._boot)

    def _boot(self) -> None:
        d = Deferred.fromCoroutine(self._start())
        d.addCallbacks(self.started.callback, self._fatal)

    async def _start(self) -> None:
        await self.storage.start()
        self.retention.setServiceParent(self)
        self.state_sync.setServiceParent(self)
        await self.pubsub.start(self.server.engine.receive_remote, self.server.engine.resync)
        await self._listen()
        self._housekeeping.start(housekeeping_interval(self.config), now=False)

    def cleanup(self) -> Deferred:
        """
        Forget the delta log and the tombstones older than their retention, in storage and in
        the cached documents.  Never fails (a failure would end the timer): storage being down
        is logged, and the next run catches up.
        """
        now = self._reactor.seconds()
        tombstones_before = now - self.config.tombstone_retention
        for doc in self.server.engine.registry.documents():
            doc.collect_tombstones(int(tombstones_before * 1000))
        d = self.storage.cleanup(now - self.config.deltas_retention, tombstones_before)
        d.addCallbacks(self._cleaned, self._cleanup_failed)
        return d

    def _cleaned(self, cleaned: Cleaned) -> None:
        if any(cleaned):
            self._log.info(
                "cleanup forgot {deltas} delta log rows and old tombstones of {documents} documents",
                deltas=cleaned.deltas,
                documents=cleaned.documents,
            )

    def _cleanup_failed(self, failure: Failure) -> None:
        if failure.check(StorageUnavailable):
            self._log.warn("cleanup postponed: {error}", error=failure.getErrorMessage())
        else:
            self._log.failure("cleanup failed", failure)

    def sync_state(self) -> Deferred:
        """
        Bring storage's reference-readable copy up to date.  Never fails (a failure would end
        the timer): storage being down is logged, and the next run catches up.
        """
        d = self.storage.sync_state()
        d.addErrback(self._sync_state_failed)
        return d

    def _sync_state_failed(self, failure: Failure) -> None:
        if failure.check(StorageUnavailable):
            self._log.warn("documents.state not brought up to date: {error}", error=failure.getErrorMessage())
        else:
            self._log.failure("bringing documents.state up to date failed", failure)

    async def _listen(self) -> None:
        listeners = self.listeners + self.metrics_listeners
        for listener in listeners:
            listener.startService()
        results = await DeferredList([listener.listening for listener in listeners], consumeErrors=True)
        failure: Optional[Failure] = None
        for listener, (ok, outcome) in zip(listeners, results):
            if ok:
                self.ports.append(outcome)
                self._log_listening(listener, outcome)
            elif listener.optional:
                self._log.warn(
                    "not listening on {endpoint}: {error}", endpoint=listener.description, error=outcome.getErrorMessage()
                )
            else:
                failure = failure or outcome
        if failure is not None:
            failure.raiseException()

    def _log_listening(self, listener: Listener, port: IListeningPort) -> None:
        if listener in self.metrics_listeners:
            self._log.info("metrics on {address} ({endpoint})", address=describe(port.getHost()), endpoint=listener.description)
            return
        self._log.info(
            "synckit listening on {address} ({endpoint}) (storage: {storage}, pub/sub: {pubsub}, auth required: {auth})",
            address=describe(port.getHost()),
            endpoint=listener.description,
            storage=self.storage.name,
            pubsub=self.pubsub.name,
            auth=self.config.auth_required,
        )

    def _fatal(self, failure: Failure) -> None:
        if failure.check(StorageUnavailable, SchemaError, PubSubUnavailable, CannotListenError):
            self._log.critical("synckit could not start: {error}", error=failure.getErrorMessage())
        else:
            self._log.failure("synckit could not start", failure)
        self.started.errback(failure)

    def stopService(self) -> Deferred:
        d = Deferred.fromCoroutine(self._stop())
        d.addErrback(lambda f: self._log.failure("unclean shutdown", f))
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    async def _stop(self) -> None:
        if self._housekeeping.running:
            self._housekeeping.stop()
        if self.retention.parent is not None:
            await self.retention.disownServiceParent()  # a cleanup under way ends first
        if self.state_sync.parent is not None:
            await self.state_sync.disownServiceParent()  # storage's stop brings it up to date last
        # Listening stops first: no new connection arrives while the open ones are closed.
        await DeferredList([maybeDeferred(listener.stopService) for listener in self.listeners + self.metrics_listeners])
        self.ports = []
        self.server.close_all(1001, "Server shutdown")
        idle = self.server.when_idle()
        idle.addTimeout(CLOSE_GRACE, self._reactor)
        try:
            await idle
        except TimeoutError:
            self._log.warn("{n} clients did not finish closing", n=len(self.server.sessions))
        await self.server.tasks.wait()
        await self.pubsub.stop()
        await self.storage.stop()
