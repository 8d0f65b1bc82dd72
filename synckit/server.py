"""
The sync server's hub: the sessions, the document registry, broadcasting, presence, and the
exchange with other instances.  Plain Python driven by a clock; the WebSocket adapter and the
HTTP resources call into it.
"""

from __future__ import annotations

import itertools
from time import perf_counter
from typing import Any, Iterable, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from synckit.auth import ADMIN, ADMIN_CLAIM, EVERYONE, EVERYONE_CLAIM, Identity, Tokens
from synckit.config import Config
from synckit.handlers import HANDLERS
from synckit.limits import ConnectionLimiter
from synckit.metrics import Metrics
from synckit.pubsub.interface import IPubSub, PubSubUnavailable
from synckit.pubsub.watches import Watches
from synckit.session import Client, Session
from synckit.storage.interface import FieldWrite, IStorage, StorageUnavailable
from synckit.sync.awareness import Awareness
from synckit.sync.broadcast import Broadcaster, deliver
from synckit.sync.document import TOMBSTONE, Document, Prior, Stamp
from synckit.sync.registry import DocumentRegistry
from synckit.tasks import BackgroundTasks
from synckit.wire import Frame, MessageIds


#: seconds between attempts to re-read a document that storage could not serve (a minute in all)
RESYNC_BACKOFF = (0.5, 1, 2, 4, 8, 15, 30)


class SyncServer:
    _log = Logger()
    handlers = HANDLERS

    def __init__(
        self, config: Config, clock: IReactorTime, storage: IStorage, pubsub: IPubSub, metrics: Optional[Metrics] = None
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.metrics.watch(self)
        self.clock = clock
        self.storage = storage
        self.pubsub = pubsub
        self.ids = MessageIds()
        self.tasks = BackgroundTasks()
        self.watches = Watches(pubsub)
        self.registry = DocumentRegistry(storage, self.watches, config.document_cache_size)
        self.broadcaster = Broadcaster(clock, self.registry, self.ids, self.metrics)
        self.awareness = Awareness(config.awareness_timeout)
        self.tokens = Tokens(config.jwt_secret, config.jwt_expires_in, config.jwt_refresh_expires_in, clock)
        self.connections = ConnectionLimiter(config.max_connections_per_ip, config.max_connections)
        self.sessions: set[Session] = set()
        self.started = clock.seconds()
        self._session_numbers = itertools.count(1)
        self._idle: list[Deferred] = []

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    # Sessions

    def open_session(self, client: Client, ip: str) -> Session:
        """
        A new connection.  Over a connection limit, it is closed at once with 1008, after the
        handshake, as the reference does.
        """
        # The id is the writer in vector clocks and LWW stamps, so it must be unique across
        # instances sharing documents: each numbers its connections from 1.
        session = Session(self, client, f"conn-{next(self._session_numbers)}@{self.pubsub.instance_id}", ip)
        refusal = self.connections.admit(ip)
        if refusal is not None:
            self._log.info("refused a connection from {ip}: {reason}", ip=ip, reason=refusal)
            session.close(1008, refusal)
            return session
        self.sessions.add(session)
        if not self.config.auth_required:
            session.authenticate(Identity(f"anonymous-{ip}", EVERYONE, EVERYONE_CLAIM))
        return session

    def session_closed(self, session: Session) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        if not self.sessions:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        self.connections.release(session.ip)
        for doc_id in session.subscriptions:
            self.registry.unsubscribe(doc_id, session)
        self.awareness.unsubscribe_all(session, session.awareness)
        for doc_id in session.awareness:
            self.watches.unwatch(doc_id)

    def api_key_identity(self, key: Any) -> Optional[Identity]:
        if isinstance(key, str) and key in self.config.api_keys:
            return Identity("api-key-user", ADMIN, ADMIN_CLAIM)
        return None

    # Writes

    async def commit(self, doc: Document, writes: Sequence[FieldWrite], priors: Sequence[Prior], since: float) -> None:
        """
        Make writes applied to C{doc} durable, then broadcast them here and publish them to the
        other instances.  The caller acknowledges only after this returns.  If storage fails,
        the writes are taken back (C{priors}: each field as it was before), so that nobody is
        sent a value that was never saved; the client gets an error instead of an ack.  C{since}
        is when the message arrived (perf_counter), for the broadcast-delay metric.
        """
        try:
            await self.storage.save_writes(doc.id, writes)
        except Exception:
            for write, prior in reversed(list(zip(writes, priors))):
                doc.undo(write.field, write.stamp, prior)
            raise
        self.broadcaster.queue(doc.id, (w.field for w in writes), since)
        payload = {"writes": [list(w) for w in writes], "clock": dict(doc.clock)}
        self._publish("delta", doc.id, payload)

    def subscribe_awareness(self, session: Session, doc_id: str) -> list[dict[str, Any]]:
        """Add a presence subscriber; other instances' presence updates for the document now come here."""
        if doc_id not in session.awareness:
            session.awareness.add(doc_id)
            self.watches.watch(doc_id)
        return self.awareness.subscribe(doc_id, session)

    def update_awareness(self, doc_id: str, client_id: str, state: Any, clock: Any) -> None:
        self._apply_awareness(doc_id, client_id, state, clock)
        payload = {"clientId": client_id, "state": state, "clock": clock}
        self._publish("awareness", doc_id, payload)

    def _apply_awareness(self, doc_id: str, client_id: str, state: Any, clock: Any) -> None:
        now = self.now_ms()
        subscribers = self.awareness.update(doc_id, client_id, state, clock, now)
        body = {"id": self.ids(now), "documentId": doc_id, "clientId": client_id, "state": state, "clock": clock}
        self.deliver(Frame("awareness_update", now, body), subscribers)

    def deliver(self, frame: Frame, recipients: Iterable[Session], exclude: Optional[Session] = None) -> None:
        """Send one frame to every authenticated recipient but C{exclude}, and count it."""
        self.metrics.sent.inc(frame.type, deliver(frame, recipients, exclude))

    def _publish(self, kind: str, doc_id: str, payload: dict[str, Any]) -> None:
        """
        Tell the other instances, in the background.  While pub/sub is down the publication is
        lost (pub/sub logs the outage once, and the others resync from storage when it is back).
        """
        d = self.pubsub.publish(kind, doc_id, payload)
        if d.called and d.result is None:
            return  # done already (the in-process bus): nothing to wait for or log
        d.addErrback(lambda f: f.trap(PubSubUnavailable) and None)
        self.tasks.add(d, f"publishing {kind}")

    def receive_remote(self, kind: str, doc_id: str, payload: dict[str, Any]) -> None:
        """Another instance's publication: merge it, and broadcast what changed here."""
        if kind == "awareness":
            self._apply_awareness(doc_id, payload["clientId"], payload["state"], payload["clock"])
            return
        doc = self.registry.peek(doc_id)
        if doc is None:
            return  # not cached here: it will be read from storage when it is next opened
        writes = ((field, value, (ts, counter, writer)) for field, value, writer, counter, ts in payload["writes"])
        self._merge(doc, writes, payload["clock"])

    def _merge(self, doc: Document, writes: Iterable[tuple[str, Any, Stamp]], clock: Any) -> None:
        """Merge writes made elsewhere into a cached document and broadcast those that won."""
        changed = [field for field, value, stamp in writes if doc.merge(field, value, stamp)]
        doc.merge_clock(clock)
        if changed:
            self.broadcaster.queue(doc.id, changed, perf_counter())

    def resync(self) -> None:
        """
        Re-read every cached document from storage and merge what other instances saved, after
        pub/sub may have lost their publications (a reconnect).
        """
        for doc in list(self.registry.documents()):
            self.tasks.add(Deferred.fromCoroutine(self._resync(doc)), f"resyncing {doc.id}")

    async def _resync(self, doc: Document) -> None:
        for delay in (*RESYNC_BACKOFF, None):
            try:
                stored = await self.storage.load(doc.id)
                break
            except StorageUnavailable:
                if delay is None:
                    self._log.warn("could not resync {doc}: storage stayed unavailable", doc=doc.id)
                    return
                await deferLater(self.clock, delay, lambda: None)
        if stored is not None:
            writes = ((field, stored.fields.get(field, TOMBSTONE), stamp) for field, stamp in stored.stamps.items())
            self._merge(doc, writes, stored.clock)

    # Housekeeping and shutdown

    def housekeeping(self) -> None:
        """Expire silent presence and stale chunk sets (every 30 s, section 4.13)."""
        now = self.now_ms()
        for doc_id, client_id, subscribers in self.awareness.expire(now):
            body = {"id": self.ids(now), "documentId": doc_id, "clientId": client_id, "state": None, "clock": now}
            self.deliver(Frame("awareness_update", now, body), subscribers)
        seconds = self.clock.seconds()
        for session in self.sessions:
            if session.chunks:
                session.chunks.expire(seconds)

    def when_idle(self) -> Deferred:
        """Fires when no connection is open."""
        d: Deferred = Deferred()
        if self.sessions:
            self._idle.append(d)
        else:
            d.callback(None)
        return d

    def close_all(self, code: int, reason: str) -> None:
        """Send what is pending, then close every connection."""
        self.broadcaster.flush()
        for session in list(self.sessions):
            session.close(code, reason)

    async def clear(self) -> None:
        """Forget every document and presence state (the test reset endpoint)."""
        self.awareness.clear()
        await self.registry.clear()

    def stats(self) -> dict[str, Any]:
        users = {s.identity.user_id for s in self.sessions if s.identity is not None}
        return {
            "connections": {"totalConnections": len(self.sessions), "totalUsers": len(users), "totalClients": 0},
            "documents": {
                "totalDocuments": len(self.registry),
                "documents": [
                    {"id": doc.id, "subscribers": len(self.registry.subscribers(doc.id)), "lastModified": doc.last_modified}
                    for doc in self.registry.documents()
                ],
            },
        }
