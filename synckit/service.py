"""
The root service: storage, then pub/sub, then the listening port, started in that order once the
reactor runs, and stopped in reverse.  Stopping sends what is pending, closes every WebSocket with
1001, waits (briefly) for the clients to acknowledge, and lets running handlers finish before
storage closes.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from synckit.config import Config
from synckit.pubsub.interface import IPubSub, PubSubUnavailable
from synckit.pubsub.local import LocalBus, LocalPubSub
from synckit.server import SyncServer
from synckit.storage.interface import IStorage, StorageUnavailable
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


def interfaces(host: str) -> list[str]:
    """
    The addresses to bind for C{host}: ``localhost`` is both loopbacks, since clients resolve it
    to ``::1`` or ``127.0.0.1``; ``::`` is dual-stack on Linux.
    """
    if host == "localhost":
        return ["127.0.0.1", "::1"]
    return [host]


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
        self.ports: list[IListeningPort] = []
        self._housekeeping = LoopingCall(self.server.housekeeping)
        self._housekeeping.clock = reactor
        #: fires once the port is listening, or fails if start-up failed.
        self.started: Deferred = Deferred()

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._boot)

    def _boot(self) -> None:
        d = Deferred.fromCoroutine(self._start())
        d.addCallbacks(self.started.callback, self._fatal)

    async def _start(self) -> None:
        await self.storage.start()
        await self.pubsub.start(self.server.engine.receive_remote, self.server.engine.resync)
        port = self.config.port
        for interface in interfaces(self.config.host):
            try:
                listening = self._reactor.listenTCP(port, self.listener, interface=interface)
            except Exception:
                if self.ports and interface == "::1":
                    self._log.warn("no IPv6 loopback: listening on 127.0.0.1 only")
                    continue
                raise
            self.ports.append(listening)
            port = listening.getHost().port  # port 0: the second address shares the first's
            self._log.info(
                "synckit listening on {interface} port {port} (storage: {storage}, pub/sub: {pubsub}, auth required: {auth})",
                interface=interface,
                port=port,
                storage=self.storage.name,
                pubsub=self.pubsub.name,
                auth=self.config.auth_required,
            )
        if self.config.metrics_port is not None:
            site = metrics_site(self.server.metrics, self.server)
            listening = self._reactor.listenTCP(self.config.metrics_port, site, interface=self.config.metrics_host)
            self.ports.append(listening)
            self._log.info(
                "metrics on {interface} port {port}", interface=self.config.metrics_host, port=listening.getHost().port
            )
        self._housekeeping.start(housekeeping_interval(self.config), now=False)

    def _fatal(self, failure: Failure) -> None:
        if failure.check(StorageUnavailable, SchemaError, PubSubUnavailable):
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
        await DeferredList([maybeDeferred(p.stopListening) for p in self.ports])
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
