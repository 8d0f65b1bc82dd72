"""
Presence (awareness), PROTOCOL.md section 4.13: per document, the last state each client id
published, and the connections that asked to hear about changes.

Held in memory only.  A client that stops updating disappears after the timeout: the periodic
sweep removes it and its subscribers are told (``state: null``).  A disconnect does not remove a
state, since the server cannot tell which client id was that connection's; it expires instead.
"""

from __future__ import annotations

from typing import Any, Hashable, NamedTuple


class Presence(NamedTuple):
    state: Any
    clock: Any
    updated_ms: int


class Awareness:
    def __init__(self, timeout_ms: int = 30_000) -> None:
        self.timeout_ms = timeout_ms
        self._states: dict[str, dict[str, Presence]] = {}
        self._subscribers: dict[str, set[Hashable]] = {}

    def subscribe(self, doc_id: str, subscriber: Hashable) -> list[dict[str, Any]]:
        """Add a subscriber; returns the states present now, as ``awareness_state`` lists them."""
        self._subscribers.setdefault(doc_id, set()).add(subscriber)
        return [
            {"clientId": client_id, "state": p.state, "clock": p.clock}
            for client_id, p in self._states.get(doc_id, {}).items()
        ]

    def update(self, doc_id: str, client_id: str, state: Any, clock: Any, now_ms: int) -> set[Hashable]:
        """
        Store (or, for a C{None} state, remove) a client's state, with no clock comparison, as
        the reference does.  Returns the document's subscribers, to be told.
        """
        if state is None:
            states = self._states.get(doc_id)
            if states is not None:
                states.pop(client_id, None)
                self._forget_if_unused(doc_id)
        else:
            self._states.setdefault(doc_id, {})[client_id] = Presence(state, clock, now_ms)
        return self._subscribers.get(doc_id, set())

    def expire(self, now_ms: int) -> list[tuple[str, str, set[Hashable]]]:
        """Remove states older than the timeout; returns (document, client id, subscribers)."""
        expired = []
        cutoff = now_ms - self.timeout_ms
        for doc_id in list(self._states):
            states = self._states[doc_id]
            for client_id in [c for c, p in states.items() if p.updated_ms < cutoff]:
                del states[client_id]
                expired.append((doc_id, client_id, self._subscribers.get(doc_id, set())))
            self._forget_if_unused(doc_id)
        return expired

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
