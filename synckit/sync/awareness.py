"""
Presence (awareness): per document, the last state each client id published, who published it,
and the connections that hear about changes.

Held in memory only.  Presence published by a connection of this instance lasts as long as that
connection: it ends when the connection closes or unsubscribes, never by a timer (SyncKit clients
do not refresh presence that does not change).  Presence from other instances has no connection
here to watch, so their owners' instance refreshes it (L{Awareness.refresh}) and it expires when
the refreshes stop: the instance is gone without a word.

What this instance's connections publish is bounded (L{Awareness.admit}): client ids per document
and per connection; other instances bound their own connections' presence.  A client id belongs
to the user who first published it, until its presence ends: another user cannot replace or
remove it (the same user can, from a new connection: a client that reconnected).
"""

from __future__ import annotations

from typing import Any, Hashable, NamedTuple, Optional, Sequence


class Presence(NamedTuple):
    state: Any
    clock: Any
    #: when it was last published (ours) or last heard of (another instance's), ms
    updated_ms: int
    #: the connection here that published it, or C{None} for another instance's
    owner: Optional[Hashable]
    #: the user who published it (C{None}: not known, from an older instance)
    user: Optional[str] = None


class PresenceLimit(Exception):
    """Publishing that presence would go over a bound; the message says which."""


class Awareness:
    def __init__(self, timeout_ms: int = 30_000) -> None:
        self.timeout_ms = timeout_ms
        self._states: dict[str, dict[str, Presence]] = {}
        self._subscribers: dict[str, set[Hashable]] = {}
        #: how many states each connection here owns, over all documents
        self._owned: dict[Hashable, int] = {}

    def admit(
        self, doc_id: str, client_id: str, owner: Hashable, user: str, state: Any, per_document: int, per_owner: int
    ) -> None:
        """
        Check that C{owner}, a connection of C{user}, may publish C{state} for C{client_id} on
        C{doc_id}: never over another user's presence; replacing or removing its own always; a
        new one only under both bounds (client ids are the client's to make up, so without them
        one connection could fill memory with states, and every ``awareness_state`` sent with
        them).

        @raise PresenceLimit: when it may not.
        """
        states = self._states.get(doc_id, {})
        present = states.get(client_id)
        if present is not None and present.user is not None and present.user != user:
            raise PresenceLimit(f"Presence of client {client_id!r} belongs to another user")
        if state is None or present is not None and present.owner is owner:
            return
        if present is None and len(states) >= per_document:
            raise PresenceLimit(f"Too many presence states on this document (max {per_document})")
        if self._owned.get(owner, 0) >= per_owner:
            raise PresenceLimit(f"Too many presence states on this connection (max {per_owner})")

    def subscribe(self, doc_id: str, subscriber: Hashable) -> list[dict[str, Any]]:
        """Add a subscriber; returns the states present now, as ``awareness_state`` lists them."""
        self._subscribers.setdefault(doc_id, set()).add(subscriber)
        return [
            {"clientId": client_id, "state": p.state, "clock": p.clock}
            for client_id, p in self._states.get(doc_id, {}).items()
        ]

    def update(
        self,
        doc_id: str,
        client_id: str,
        state: Any,
        clock: Any,
        now_ms: int,
        owner: Optional[Hashable],
        user: Optional[str] = None,
    ) -> set[Hashable]:
        """
        Store (or, for a C{None} state, remove) a client's state, with no clock comparison, as
        the reference does.  Returns the document's subscribers, to be told.
        """
        if state is None:
            states = self._states.get(doc_id)
            if states is not None:
                self._disown(states.pop(client_id, None))
                self._forget_if_unused(doc_id)
        else:
            states = self._states.setdefault(doc_id, {})
            self._disown(states.get(client_id))
            states[client_id] = Presence(state, clock, now_ms, owner, user)
            if owner is not None:
                self._owned[owner] = self._owned.get(owner, 0) + 1
        return self._subscribers.get(doc_id, set())

    def _disown(self, presence: Optional[Presence]) -> None:
        """A state is removed or replaced: its owner owns one fewer."""
        owner = presence.owner if presence is not None else None
        if owner is not None:
            count = self._owned[owner] - 1
            if count:
                self._owned[owner] = count
            else:
                del self._owned[owner]

    def owned(self, owner: Hashable, doc_ids: Optional[Sequence[str]]) -> list[tuple[str, str]]:
        """(document, client id) of the presence C{owner} published, on C{doc_ids} or anywhere."""
        found = []
        for doc_id in self._states if doc_ids is None else doc_ids:
            for client_id, presence in self._states.get(doc_id, {}).items():
                if presence.owner is owner:
                    found.append((doc_id, client_id))
        return found

    def expire(self, now_ms: int) -> list[tuple[str, str, set[Hashable]]]:
        """
        Remove other instances' states not heard of within the timeout; returns (document,
        client id, subscribers).
        """
        expired = []
        cutoff = now_ms - self.timeout_ms
        for doc_id in list(self._states):
            states = self._states[doc_id]
            for client_id in [c for c, p in states.items() if p.owner is None and p.updated_ms < cutoff]:
                del states[client_id]
                expired.append((doc_id, client_id, self._subscribers.get(doc_id, set())))
            self._forget_if_unused(doc_id)
        return expired

    def refresh(self, now_ms: int) -> list[tuple[str, str, Presence]]:
        """
        Our connections' states last published more than half the timeout ago, marked as
        published now: the caller publishes them again, so that other instances keep them.
        """
        cutoff = now_ms - self.timeout_ms // 2
        due = []
        for doc_id, states in self._states.items():
            for client_id, p in states.items():
                if p.owner is not None and p.updated_ms <= cutoff:
                    states[client_id] = p._replace(updated_ms=now_ms)
                    due.append((doc_id, client_id, p))
        return due

    def unsubscribe_all(self, subscriber: Hashable, doc_ids: set[str]) -> None:
        for doc_id in doc_ids:
            subscribers = self._subscribers.get(doc_id)
            if subscribers is not None:
                subscribers.discard(subscriber)
                if not subscribers:
                    del self._subscribers[doc_id]
                self._forget_if_unused(doc_id)

    def _forget_if_unused(self, doc_id: str) -> None:
        if not self._states.get(doc_id):
            self._states.pop(doc_id, None)

    def clear(self) -> None:
        self._states.clear()
        self._owned.clear()
