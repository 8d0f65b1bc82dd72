"""
The server: its connections (sessions), their limits and identities, and the sync engine they
share.  Plain Python driven by a clock; the WebSocket adapter and the HTTP resources call into it.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from synckit.auth import ADMIN, ADMIN_CLAIM, EVERYONE, EVERYONE_CLAIM, Identity, Tokens
from synckit.chunks import ChunkMemory
from synckit.config import Config
from synckit.handlers import HANDLERS
from synckit.limits import ConnectionLimiter
from synckit.metrics import Metrics, State
from synckit.output import OutputBatch
from synckit.pubsub.interface import IPubSub
from synckit.session import Client, Session
from synckit.storage.interface import IStorage
from synckit.sync.engine import SyncEngine
from synckit.tasks import BackgroundTasks
from synckit.wire import MessageIds


class SyncServer:
    _log = Logger()
    handlers = HANDLERS

    def __init__(
        self, config: Config, clock: IReactorTime, storage: IStorage, pubsub: IPubSub, metrics: Optional[Metrics] = None
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.metrics.watch(self._state)
        self.clock = clock
        self.storage = storage
        self.pubsub = pubsub
        self.ids = MessageIds()
        self.tasks = BackgroundTasks()
        #: batches what is sent to connections (L{synckit.output})
        self.output = OutputBatch()
        self.engine = SyncEngine(
            clock,
            storage,
            pubsub,
            self.metrics,
            self.ids,
            self.tasks,
            config.document_cache_size,
            config.awareness_timeout,
            config.database_pool_size,
            self.output,
        )
        self.tokens = Tokens.from_config(config, clock)
        self.connections = ConnectionLimiter(config.max_connections_per_ip, config.max_connections)
        self.chunk_memory = ChunkMemory(config.max_chunk_memory)
        self.sessions: set[Session] = set()
        self.started = clock.seconds()
        self._session_numbers = itertools.count(1)
        self._idle: list[Deferred] = []

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _state(self) -> State:
        sessions = self.sessions
        return State(
            connections=len(sessions),
            authenticated=sum(1 for s in sessions if s.authenticated),
            documents=len(self.engine.registry),
            subscriptions=sum(len(s.subscriptions) for s in sessions),
            reconnects={b.name: getattr(b, "reconnects", 0) for b in (self.storage, self.pubsub)},
        )

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
        self.engine.forget(session)

    def api_key_identity(self, key: Any) -> Optional[Identity]:
        if isinstance(key, str) and key in self.config.api_keys:
            return Identity("api-key-user", ADMIN, ADMIN_CLAIM)
        return None

    # Housekeeping and shutdown

    def housekeeping(self) -> None:
        """Presence expiry and refresh, stale chunk sets, expired tokens (every few seconds)."""
        self.engine.housekeeping()
        seconds = self.clock.seconds()
        for session in list(self.sessions):
            if session.chunks:
                session.chunks.expire(seconds)
            session.expired(seconds)

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
        self.engine.broadcaster.flush()
        for session in list(self.sessions):
            session.close(code, reason)

    def stats(self) -> dict[str, Any]:
        users = {s.identity.user_id for s in self.sessions if s.identity is not None}
        registry = self.engine.registry
        return {
            "connections": {"totalConnections": len(self.sessions), "totalUsers": len(users), "totalClients": 0},
            "documents": {
                "totalDocuments": len(registry),
                "documents": [
                    {"id": doc.id, "subscribers": len(registry.subscribers(doc.id)), "lastModified": doc.last_modified}
                    for doc in registry.documents()
                ],
            },
        }
