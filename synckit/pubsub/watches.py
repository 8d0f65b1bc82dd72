"""
Reference counts over L{IPubSub.watch}: a document is watched while anything on this instance
needs to hear about it (it is cached, or someone subscribed to its presence), and unwatched when
the last of them lets go.
"""

from __future__ import annotations

from synckit.pubsub.interface import IPubSub


class Watches:
    def __init__(self, pubsub: IPubSub) -> None:
        self._pubsub = pubsub
        self._counts: dict[str, int] = {}

    def watch(self, doc_id: str) -> None:
        count = self._counts.get(doc_id, 0)
        if count == 0:
            self._pubsub.watch(doc_id)
        self._counts[doc_id] = count + 1

    def unwatch(self, doc_id: str) -> None:
        count = self._counts.get(doc_id, 0) - 1
        if count > 0:
            self._counts[doc_id] = count
        elif count == 0:
            del self._counts[doc_id]
            self._pubsub.unwatch(doc_id)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._counts
