"""
Presence (PROTOCOL.md section 4.13): the L{Awareness} store on its own, and the awareness
messages through the server on a Clock.  Our deviation (R-6): both messages need an authenticated
connection that may read the document.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from synckit.session import Session
from synckit.sync.awareness import Awareness
from tests.helpers import FakeClient, Harness, HarnessCase

NOW = 1_700_000_000_000


def body(message: dict[str, Any]) -> dict[str, Any]:
    """A message without its envelope (type, id, timestamp)."""
    return {k: v for k, v in message.items() if k not in ("type", "id", "timestamp")}


class AwarenessStoreTests(SynchronousTestCase):
    def test_subscribe_lists_present_states(self) -> None:
        """subscribe() adds the subscriber and returns every present client's state and clock."""
        awareness = Awareness()
        self.assertEqual(awareness.subscribe("d", "s1"), [])
        awareness.update("d", "c1", {"name": "Ann"}, 1, NOW)
        awareness.update("d", "c2", {"name": "Bob"}, {"c2": 4}, NOW)
        awareness.update("other", "c3", {"name": "Cid"}, 1, NOW)
        states = awareness.subscribe("d", "s2")
        self.assertEqual(
            sorted(states, key=lambda s: s["clientId"]),
            [
                {"clientId": "c1", "state": {"name": "Ann"}, "clock": 1},
                {"clientId": "c2", "state": {"name": "Bob"}, "clock": {"c2": 4}},
            ],
        )

    def test_update_returns_subscribers(self) -> None:
        """update() returns the document's subscribers (to be told), whatever the state."""
        awareness = Awareness()
        awareness.subscribe("d", "s1")
        awareness.subscribe("d", "s2")
        awareness.subscribe("other", "s3")
        self.assertEqual(awareness.update("d", "c1", {"x": 1}, 1, NOW), {"s1", "s2"})
        self.assertEqual(awareness.update("d", "c1", None, 2, NOW), {"s1", "s2"})
        self.assertEqual(awareness.update("nobody", "c1", {"x": 1}, 1, NOW), set())

    def test_no_clock_comparison(self) -> None:
        """A stale update (lower clock) still overwrites a newer one."""
        awareness = Awareness()
        awareness.update("d", "c1", "new", 9, NOW)
        awareness.update("d", "c1", "old", 1, NOW)
        self.assertEqual(awareness.subscribe("d", "s"), [{"clientId": "c1", "state": "old", "clock": 1}])

    def test_null_removes(self) -> None:
        """A null state removes the client; removing an absent client is harmless."""
        awareness = Awareness()
        awareness.update("d", "c1", "here", 1, NOW)
        awareness.update("d", "c1", None, 2, NOW)
        awareness.update("d", "ghost", None, 1, NOW)
        self.assertEqual(awareness.subscribe("d", "s"), [])

    def test_expire_after_timeout(self) -> None:
        """A state is removed once it is more than the timeout old, not at exactly the timeout."""
        awareness = Awareness(timeout_ms=30_000)
        awareness.subscribe("d", "s1")
        awareness.update("d", "c1", "here", 1, NOW)
        awareness.update("d", "c2", "here", 1, NOW + 10_000)
        self.assertEqual(awareness.expire(NOW + 30_000), [])
        self.assertEqual(awareness.expire(NOW + 30_001), [("d", "c1", {"s1"})])
        self.assertEqual([s["clientId"] for s in awareness.subscribe("d", "s1")], ["c2"])

    def test_update_refreshes(self) -> None:
        """Re-sending a state restarts its timeout."""
        awareness = Awareness(timeout_ms=30_000)
        awareness.update("d", "c1", "here", 1, NOW)
        awareness.update("d", "c1", "still here", 2, NOW + 20_000)
        self.assertEqual(awareness.expire(NOW + 40_000), [])

    def test_unsubscribe_all_keeps_states(self) -> None:
        """Dropping a subscriber leaves the states, and the other subscribers, in place."""
        awareness = Awareness()
        awareness.subscribe("d", "s1")
        awareness.subscribe("d", "s2")
        awareness.update("d", "c1", "here", 1, NOW)
        awareness.unsubscribe_all("s1", {"d", "never-subscribed"})
        self.assertEqual(awareness.update("d", "c2", "too", 1, NOW), {"s2"})
        self.assertEqual(len(awareness.subscribe("d", "s3")), 2)

    def test_clear_forgets_states(self) -> None:
        """clear() removes every state."""
        awareness = Awareness()
        awareness.update("d", "c1", "here", 1, NOW)
        awareness.clear()
        self.assertEqual(awareness.subscribe("d", "s"), [])


class AwarenessMessageTests(HarnessCase):

    def watcher(self, h: Harness, doc_id: str = "d") -> tuple[Session, FakeClient]:
        """A connection that sent awareness_subscribe, with its awareness_state taken."""
        session, client = h.connect()
        h.send(session, "awareness_subscribe", {"documentId": doc_id})
        self.assertEqual([m["type"] for m in client.take()], ["awareness_state"])
        return session, client


    def update(self, h: Harness, session: Session, client_id: str, state: Any, clock: Any = 1, doc_id: str = "d") -> None:
        h.send(session, "awareness_update", {"documentId": doc_id, "clientId": client_id, "state": state, "clock": clock})

    def test_subscribe_answers_state(self) -> None:
        """awareness_subscribe is answered with awareness_state listing the present states (possibly none)."""
        h = self.harness()
        session, client = h.connect()
        h.send(session, "awareness_subscribe", {"documentId": "d"})
        [reply] = client.take()
        self.assertEqual((reply["type"], body(reply)), ("awareness_state", {"documentId": "d", "states": []}))

        self.update(h, session, "c1", {"cursor": 3}, 5)
        client.take()
        other, other_client = h.connect()
        h.send(other, "awareness_subscribe", {"documentId": "d"})
        [reply] = other_client.take()
        self.assertEqual(body(reply), {"documentId": "d", "states": [{"clientId": "c1", "state": {"cursor": 3}, "clock": 5}]})

    def test_update_broadcast_to_awareness_subscribers(self) -> None:
        """
        An update is stored and sent at once, echoing the client's values, to every awareness
        subscriber of the document, the sender included; document-only subscribers and
        awareness subscribers of other documents get nothing.
        """
        h = self.harness()
        sender, sender_client = self.watcher(h)
        _, peer_client = self.watcher(h)
        _, elsewhere_client = self.watcher(h, "other")
        doc_only, doc_only_client = h.connect()
        h.send(doc_only, "subscribe", {"id": "s", "documentId": "d"})
        doc_only_client.take()

        self.update(h, sender, "c1", {"name": "Ann"}, {"c1": 2})

        expected = {"documentId": "d", "clientId": "c1", "state": {"name": "Ann"}, "clock": {"c1": 2}}
        for client in (sender_client, peer_client):
            [message] = client.take()
            self.assertEqual((message["type"], body(message)), ("awareness_update", expected))
        self.assertEqual(doc_only_client.take(), [])
        self.assertEqual(elsewhere_client.take(), [])
        self.assertEqual(h.present(), [{"clientId": "c1", "state": {"name": "Ann"}, "clock": {"c1": 2}}])

    def test_sender_need_not_subscribe(self) -> None:
        """A sender that did not awareness_subscribe gets nothing back, while subscribers are told."""
        h = self.harness()
        _, watcher_client = self.watcher(h)
        sender, sender_client = h.connect()
        self.update(h, sender, "c1", "here")
        self.assertEqual(sender_client.take(), [])
        self.assertEqual([m["type"] for m in watcher_client.take()], ["awareness_update"])

    def test_null_state_removes(self) -> None:
        """An update with state null removes the client and is broadcast as null."""
        h = self.harness()
        session, client = self.watcher(h)
        self.update(h, session, "c1", "here")
        self.update(h, session, "c1", None, 2)
        messages = client.take()
        self.assertEqual([(m["clientId"], m["state"]) for m in messages], [("c1", "here"), ("c1", None)])
        late, late_client = h.connect()
        h.send(late, "awareness_subscribe", {"documentId": "d"})
        self.assertEqual(late_client.take()[0]["states"], [])

    def test_expiry_broadcasts_null(self) -> None:
        """
        After more than the timeout without an update, housekeeping removes the state and tells
        the subscribers: state null, clock the server's time in ms.
        """
        h = self.harness()
        session, client = self.watcher(h)
        self.update(h, session, "c1", "here")
        client.take()
        h.clock.advance(30)
        h.server.housekeeping()
        self.assertEqual(client.take(), [])  # exactly the timeout: still present
        h.clock.advance(1)
        h.server.housekeeping()
        [message] = client.take()
        now = h.server.now_ms()
        self.assertEqual(
            (message["type"], body(message)),
            ("awareness_update", {"documentId": "d", "clientId": "c1", "state": None, "clock": now}),
        )
        self.assertEqual(message["timestamp"], now)
        h.server.housekeeping()
        self.assertEqual(client.take(), [])
        self.assertEqual(h.present(), [])

    def test_expiry_respects_configured_timeout(self) -> None:
        """The sweep uses the configured awareness timeout."""
        h = self.harness(awareness_timeout=5_000)
        session, client = self.watcher(h)
        self.update(h, session, "c1", "here")
        client.take()
        h.clock.advance(5.5)
        h.server.housekeeping()
        self.assertEqual([m["state"] for m in client.take()], [None])

    def test_update_keeps_state_alive(self) -> None:
        """A client that re-sends its state within the timeout is not expired."""
        h = self.harness()
        session, client = self.watcher(h)
        self.update(h, session, "c1", "here")
        h.clock.advance(20)
        self.update(h, session, "c1", "here", 2)
        h.clock.advance(20)
        h.server.housekeeping()
        self.assertEqual([m["state"] for m in client.take()], ["here", "here"])

    def test_disconnect_keeps_state(self) -> None:
        """
        A disconnect removes the connection from the awareness subscribers but leaves the state
        it published, which later expires and is announced to the remaining subscribers.
        """
        h = self.harness()
        leaver, leaver_client = self.watcher(h)
        _, stayer_client = self.watcher(h)
        self.update(h, leaver, "c1", "here")
        leaver_client.take()
        stayer_client.take()
        leaver.closed()
        self.assertNotIn(leaver, h.server.awareness.update("d", "probe", None, None, h.server.now_ms()))
        self.assertEqual(
            h.present(), [{"clientId": "c1", "state": "here", "clock": 1}]
        )
        h.clock.advance(31)
        h.server.housekeeping()
        self.assertEqual([(m["clientId"], m["state"]) for m in stayer_client.take()], [("c1", None)])
        self.assertEqual(leaver_client.take(), [])

    def test_not_authenticated(self) -> None:
        """With auth required, an unauthenticated connection is refused both awareness messages (R-6)."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "awareness_subscribe", {"documentId": "d"})
        self.update(h, session, "c1", "here")
        self.assertEqual([(m["type"], m["error"]) for m in client.take()], [("error", "Not authenticated")] * 2)
        self.assertEqual(h.server.awareness.expire(h.server.now_ms() + 10**9), [])  # nothing was stored

    def test_unauthenticated_watcher_not_told(self) -> None:
        """An unauthenticated connection in the subscriber set (only reachable directly) receives no updates."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.server.awareness.subscribe("d", session)
        h.server.housekeeping()
        h.server.update_awareness("d", "c1", "here", 1)
        self.assertEqual(client.take(), [])

    def test_missing_client_id(self) -> None:
        """An update without a client id is refused with "Failed to update awareness"."""
        h = self.harness()
        session, client = self.watcher(h)
        h.send(session, "awareness_update", {"documentId": "d", "state": "here"})
        self.assertEqual([(m["type"], m["error"]) for m in client.take()], [("error", "Failed to update awareness")])
