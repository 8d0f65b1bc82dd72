"""
Presence: the L{Awareness} store on its own, and the awareness messages through the server on a
Clock.  Our deviations from the reference: both messages need an authenticated connection that
may read the document; presence lasts as long as the connection that published it, which hears
the others' presence as if it had subscribed; only other instances' presence expires.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from synckit.pubsub.local import LocalBus
from synckit.session import Session
from synckit.sync.awareness import Awareness, PresenceLimit
from tests.helpers import FakeClient, Harness, HarnessCase

NOW = 1_700_000_000_000
#: the owner of presence published by another instance
REMOTE = None


def body(message: dict[str, Any]) -> dict[str, Any]:
    """A message without its envelope (type, id, timestamp)."""
    return {k: v for k, v in message.items() if k not in ("type", "id", "timestamp")}


class AwarenessStoreTests(SynchronousTestCase):
    def test_subscribe_lists_present_states(self) -> None:
        """subscribe() adds the subscriber and returns every present client's state and clock."""
        awareness = Awareness()
        self.assertEqual(awareness.subscribe("d", "s1"), [])
        awareness.update("d", "c1", {"name": "Ann"}, 1, NOW, REMOTE)
        awareness.update("d", "c2", {"name": "Bob"}, {"c2": 4}, NOW, REMOTE)
        awareness.update("other", "c3", {"name": "Cid"}, 1, NOW, REMOTE)
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
        self.assertEqual(awareness.update("d", "c1", {"x": 1}, 1, NOW, REMOTE), {"s1", "s2"})
        self.assertEqual(awareness.update("d", "c1", None, 2, NOW, REMOTE), {"s1", "s2"})
        self.assertEqual(awareness.update("nobody", "c1", {"x": 1}, 1, NOW, REMOTE), set())

    def test_no_clock_comparison(self) -> None:
        """A stale update (lower clock) still overwrites a newer one."""
        awareness = Awareness()
        awareness.update("d", "c1", "new", 9, NOW, REMOTE)
        awareness.update("d", "c1", "old", 1, NOW, REMOTE)
        self.assertEqual(awareness.subscribe("d", "s"), [{"clientId": "c1", "state": "old", "clock": 1}])

    def test_null_removes(self) -> None:
        """A null state removes the client; removing an absent client is harmless."""
        awareness = Awareness()
        awareness.update("d", "c1", "here", 1, NOW, REMOTE)
        awareness.update("d", "c1", None, 2, NOW, REMOTE)
        awareness.update("d", "ghost", None, 1, NOW, REMOTE)
        self.assertEqual(awareness.subscribe("d", "s"), [])

    def test_expire_after_timeout(self) -> None:
        """
        Another instance's state is removed once it is more than the timeout old, not at exactly
        the timeout.
        """
        awareness = Awareness(timeout_ms=30_000)
        awareness.subscribe("d", "s1")
        awareness.update("d", "c1", "here", 1, NOW, REMOTE)
        awareness.update("d", "c2", "here", 1, NOW + 10_000, REMOTE)
        self.assertEqual(awareness.expire(NOW + 30_000), [])
        self.assertEqual(awareness.expire(NOW + 30_001), [("d", "c1", {"s1"})])
        self.assertEqual([s["clientId"] for s in awareness.subscribe("d", "s1")], ["c2"])

    def test_update_refreshes(self) -> None:
        """Hearing of a state again restarts its timeout."""
        awareness = Awareness(timeout_ms=30_000)
        awareness.update("d", "c1", "here", 1, NOW, REMOTE)
        awareness.update("d", "c1", "still here", 2, NOW + 20_000, REMOTE)
        self.assertEqual(awareness.expire(NOW + 40_000), [])

    def test_unsubscribe_all_keeps_states(self) -> None:
        """Dropping a subscriber leaves the states, and the other subscribers, in place."""
        awareness = Awareness()
        awareness.subscribe("d", "s1")
        awareness.subscribe("d", "s2")
        awareness.update("d", "c1", "here", 1, NOW, REMOTE)
        awareness.unsubscribe_all("s1", {"d", "never-subscribed"})
        self.assertEqual(awareness.update("d", "c2", "too", 1, NOW, REMOTE), {"s2"})
        self.assertEqual(len(awareness.subscribe("d", "s3")), 2)

    def test_own_presence_never_expires(self) -> None:
        """A state published by a connection here stays however old it is: it ends with the connection."""
        awareness = Awareness(timeout_ms=30_000)
        awareness.update("d", "c1", "here", 1, NOW, "connection")
        self.assertEqual(awareness.expire(NOW + 10**9), [])
        self.assertEqual(len(awareness.subscribe("d", "s")), 1)

    def test_owned(self) -> None:
        """owned() lists the (document, client id) a connection published, everywhere or on some documents."""
        awareness = Awareness()
        awareness.update("d", "c1", "here", 1, NOW, "conn-a")
        awareness.update("e", "c1", "here", 1, NOW, "conn-a")
        awareness.update("d", "c2", "here", 1, NOW, "conn-b")
        awareness.update("d", "c3", "here", 1, NOW, REMOTE)
        self.assertEqual(sorted(awareness.owned("conn-a", None)), [("d", "c1"), ("e", "c1")])
        self.assertEqual(awareness.owned("conn-a", ["e", "never"]), [("e", "c1")])
        self.assertEqual(awareness.owned("conn-c", None), [])

    def test_publishing_takes_ownership(self) -> None:
        """The connection that last published a client id owns it (a client that reconnected)."""
        awareness = Awareness()
        awareness.update("d", "c1", "here", 1, NOW, "old")
        awareness.update("d", "c1", "here", 2, NOW, "new")
        self.assertEqual(awareness.owned("old", None), [])
        self.assertEqual(awareness.owned("new", None), [("d", "c1")])

    def test_refresh_returns_own_states_due(self) -> None:
        """
        refresh() returns our connections' states last published at least half the timeout ago,
        once per half timeout; other instances' states are never refreshed from here.
        """
        awareness = Awareness(timeout_ms=30_000)
        awareness.update("d", "c1", "here", 1, NOW, "conn")
        awareness.update("d", "c2", "there", 1, NOW, REMOTE)
        self.assertEqual(awareness.refresh(NOW + 14_999), [])
        [(doc_id, client_id, presence)] = awareness.refresh(NOW + 15_000)
        self.assertEqual((doc_id, client_id, presence.state), ("d", "c1", "here"))
        self.assertEqual(awareness.refresh(NOW + 20_000), [])
        self.assertEqual(len(awareness.refresh(NOW + 30_000)), 1)

    def test_clear_forgets_states(self) -> None:
        """clear() removes every state."""
        awareness = Awareness()
        awareness.update("d", "c1", "here", 1, NOW, REMOTE)
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

    def test_publishing_subscribes(self) -> None:
        """
        A sender that did not awareness_subscribe (a client after a reconnect does not) is
        subscribed by publishing: it is told the others' states present (not its own), and
        their later updates.
        """
        h = self.harness()
        watcher, watcher_client = self.watcher(h)
        self.update(h, watcher, "w", "watching")
        watcher_client.take()
        sender, sender_client = h.connect()
        self.update(h, sender, "c1", "here")
        state, own = sender_client.take()
        self.assertEqual(
            (state["type"], body(state)),
            ("awareness_state", {"documentId": "d", "states": [{"clientId": "w", "state": "watching", "clock": 1}]}),
        )
        self.assertEqual((own["type"], own["clientId"]), ("awareness_update", "c1"))
        self.assertEqual([m["type"] for m in watcher_client.take()], ["awareness_update"])
        self.update(h, watcher, "w", "moved", 2)
        self.assertEqual([m["state"] for m in sender_client.take()], ["moved"])

    def test_first_publisher_gets_no_empty_state(self) -> None:
        """Publishing where nobody else is present sends no awareness_state, only the update itself."""
        h = self.harness()
        sender, sender_client = h.connect()
        self.update(h, sender, "c1", "here")
        self.assertEqual([m["type"] for m in sender_client.take()], ["awareness_update"])

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

    def remote(self, h: Harness, client_id: str, state: Any, clock: Any = 1, doc_id: str = "d") -> None:
        """Presence published by a connection of another instance."""
        h.server.engine.receive_remote("awareness", doc_id, {"clientId": client_id, "state": state, "clock": clock})

    def test_expiry_broadcasts_null(self) -> None:
        """
        After more than the timeout without hearing of it, housekeeping removes another
        instance's state and tells the subscribers: state null, clock the server's time in ms.
        """
        h = self.harness()
        session, client = self.watcher(h)
        self.remote(h, "c1", "here")
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
        self.remote(h, "c1", "here")
        client.take()
        h.clock.advance(5.5)
        h.server.housekeeping()
        self.assertEqual([m["state"] for m in client.take()], [None])

    def test_own_connections_presence_does_not_expire(self) -> None:
        """
        Presence of a connection that is still open never expires, however long it stays the
        same (SyncKit clients do not refresh it).
        """
        h = self.harness()
        session, client = self.watcher(h)
        self.update(h, session, "c1", "here")
        client.take()
        for _ in range(10):
            h.clock.advance(30)
            h.server.housekeeping()
        self.assertEqual(client.take(), [])
        self.assertEqual(h.present(), [{"clientId": "c1", "state": "here", "clock": 1}])

    def test_own_presence_refreshed_on_other_instances(self) -> None:
        """
        Housekeeping publishes our connections' unchanged presence again to the other instances
        before their timeout, so it does not expire there while its connection is open.
        """
        clock = Clock()
        bus = LocalBus(clock)
        a, b = self.harness(clock=clock, bus=bus), self.harness(clock=clock, bus=bus)
        sender, _ = a.connect()
        watcher, watcher_client = b.connect()
        b.send(watcher, "awareness_subscribe", {"documentId": "d"})
        self.update(a, sender, "c1", "here")
        a.flush()
        for _ in range(8):
            a.clock.advance(10)
            a.server.housekeeping()
            b.server.housekeeping()
        states = [m["state"] for m in watcher_client.take() if m["type"] == "awareness_update"]
        self.assertEqual(set(states), {"here"})  # refreshed, never expired
        self.assertEqual(b.present(), [{"clientId": "c1", "state": "here", "clock": 1}])

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

    def test_disconnect_ends_presence(self) -> None:
        """
        A disconnect ends the presence the connection published: the remaining subscribers are
        told at once (state null), and it is gone for newcomers.
        """
        h = self.harness()
        leaver, leaver_client = self.watcher(h)
        _, stayer_client = self.watcher(h)
        self.update(h, leaver, "c1", "here")
        leaver_client.take()
        stayer_client.take()
        leaver.closed()
        self.assertEqual([(m["clientId"], m["state"]) for m in stayer_client.take()], [("c1", None)])
        self.assertEqual(h.present(), [])
        self.assertEqual(leaver_client.take(), [])

    def test_unsubscribe_ends_presence_there(self) -> None:
        """Unsubscribing from a document ends the connection's presence on it, and only there."""
        h = self.harness()
        session, _ = self.watcher(h)
        _, stayer_client = self.watcher(h)
        self.update(h, session, "c1", "here")
        self.update(h, session, "c1", "there", doc_id="e")
        stayer_client.take()
        h.send(session, "unsubscribe", {"documentId": "d"})
        self.assertEqual([(m["clientId"], m["state"]) for m in stayer_client.take()], [("c1", None)])
        self.assertEqual(h.present(), [])
        self.assertEqual(len(h.present("e")), 1)

    def test_presence_taken_over_outlives_the_old_connection(self) -> None:
        """
        A client that reconnected and published again owns its presence: the old connection's
        late close does not end it.
        """
        h = self.harness()
        old, _ = h.connect()
        self.update(h, old, "c1", "here")
        new, _ = h.connect()
        self.update(h, new, "c1", "here", 2)
        _, stayer_client = self.watcher(h)
        old.closed()
        self.assertEqual(stayer_client.take(), [])
        self.assertEqual(len(h.present()), 1)

    def test_another_users_presence_cannot_be_overwritten(self) -> None:
        """
        With auth on, a user cannot publish over (or remove) a client id another user's
        connection published: it gets an error, and everyone still sees the owner's state.
        """
        h = self.harness(auth_required=True)
        everyone = {"canRead": ["*"], "canWrite": ["*"], "isAdmin": False}

        def connect(user: str) -> tuple[Session, FakeClient]:
            session, client = h.connect()
            h.send(session, "auth", {"token": h.server.tokens.access_token(user, None, everyone)})
            client.take()
            return session, client

        alice, _ = connect("alice")
        mallory, mallory_client = connect("mallory")
        self.update(h, alice, "c1", {"name": "Alice"})
        for state in ({"name": "Mallory"}, None):
            self.update(h, mallory, "c1", state, 2)
            [error] = mallory_client.of_type("error")
            self.assertEqual(error["details"], {"documentId": "d", "code": "INVALID_MESSAGE"})
            mallory_client.take()
        def present() -> list[dict[str, Any]]:
            awareness = h.server.engine.awareness
            states = awareness.subscribe("d", "probe")
            awareness.unsubscribe_all("probe", {"d"})
            return states

        self.assertEqual(present(), [{"clientId": "c1", "state": {"name": "Alice"}, "clock": 1}])
        again, _ = connect("alice")
        self.update(h, again, "c1", {"name": "Alice again"}, 3)
        self.assertEqual(present()[0]["state"], {"name": "Alice again"})

    def test_not_authenticated(self) -> None:
        """With auth required, an unauthenticated connection is refused both awareness messages."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.send(session, "awareness_subscribe", {"documentId": "d"})
        self.update(h, session, "c1", "here")
        self.assertEqual([(m["type"], m["error"]) for m in client.take()], [("error", "Not authenticated")] * 2)
        self.assertEqual(h.server.engine.awareness.expire(h.server.now_ms() + 10**9), [])  # nothing was stored

    def test_unauthenticated_watcher_not_told(self) -> None:
        """An unauthenticated connection in the subscriber set (only reachable directly) receives no updates."""
        h = self.harness(auth_required=True)
        session, client = h.connect()
        h.server.engine.awareness.subscribe("d", session)
        h.server.housekeeping()
        self.remote(h, "c1", "here")
        self.assertEqual(client.take(), [])

    def test_missing_client_id(self) -> None:
        """An update without a client id is refused with "Failed to update awareness"."""
        h = self.harness()
        session, client = self.watcher(h)
        h.send(session, "awareness_update", {"documentId": "d", "state": "here"})
        self.assertEqual([(m["type"], m["error"]) for m in client.take()], [("error", "Failed to update awareness")])


class PresenceBoundTests(HarnessCase):
    """Presence from this instance's connections is bounded in size and number (issue 11)."""

    def update(self, h: Harness, session: Session, client_id: str, state: Any, doc_id: str = "d") -> None:
        h.send(session, "awareness_update", {"documentId": doc_id, "clientId": client_id, "state": state, "clock": 1})

    def refusals(self, client: FakeClient) -> list[str]:
        return [m["error"] for m in client.take() if m["type"] == "error"]

    def test_state_size(self) -> None:
        """A state (with its clock) over max-presence-size bytes of JSON is refused and not stored."""
        h = self.harness(max_presence_size=100)
        session, client = h.connect()
        self.update(h, session, "c1", "x" * 88)  # "x..." is 90 bytes, the clock 1
        self.update(h, session, "c2", "x" * 98)
        self.assertEqual(self.refusals(client), ["Presence state too large (101 bytes, max 100)"])
        self.assertEqual([s["clientId"] for s in h.present()], ["c1"])

    def test_per_document(self) -> None:
        """
        A document holds at most max-presence-per-document client ids: one more is refused,
        whoever sends it, while existing ones may still change or leave.
        """
        h = self.harness(max_presence_per_document=2)
        first, first_client = h.connect()
        second, second_client = h.connect()
        self.update(h, first, "c1", "a")
        self.update(h, second, "c2", "b")
        self.update(h, second, "c3", "c")
        self.assertEqual(self.refusals(second_client), ["Too many presence states on this document (max 2)"])
        self.update(h, second, "c2", "b2")
        self.update(h, first, "c1", None)
        self.update(h, second, "c3", "c")
        self.assertEqual(self.refusals(second_client), [])
        self.assertEqual(sorted(s["clientId"] for s in h.present()), ["c2", "c3"])

    def test_per_connection(self) -> None:
        """
        One connection publishes at most max-presence-per-connection client ids over all
        documents; closing it gives them back.
        """
        h = self.harness(max_presence_per_connection=2)
        session, client = h.connect()
        self.update(h, session, "c1", "a", "d1")
        self.update(h, session, "c2", "a", "d2")
        self.update(h, session, "c3", "a", "d3")
        self.assertEqual(self.refusals(client), ["Too many presence states on this connection (max 2)"])
        session.closed()
        again, again_client = h.connect()
        for n in (1, 2):
            self.update(h, again, f"c{n}", "a", f"d{n}")
        self.assertEqual(self.refusals(again_client), [])


class AwarenessAdmitTests(SynchronousTestCase):
    def test_replacing_own_state_always_admitted(self) -> None:
        """At both bounds, an owner may still replace its own state; taking over another's counts as new."""
        awareness = Awareness()
        awareness.update("d", "c1", "here", 1, NOW, "s1")
        awareness.update("d", "c2", "here", 1, NOW, "s2")
        awareness.admit("d", "c1", "s1", "u", "new", 2, 1)
        self.assertRaises(PresenceLimit, awareness.admit, "d", "c3", "s3", "u", "new", 2, 1)
        self.assertRaises(PresenceLimit, awareness.admit, "d", "c2", "s1", "u", "new", 5, 1)
        awareness.update("d", "c2", "mine", 1, NOW, "s1")  # taken over: s2 owns none now
        awareness.admit("e", "c9", "s2", "u", "new", 2, 1)

    def test_client_id_belongs_to_its_user(self) -> None:
        """
        Another user may neither replace nor remove a client id's presence; its own user may,
        from any connection (a client that reconnected).
        """
        awareness = Awareness()
        awareness.update("d", "c1", "here", 1, NOW, "s1", "alice")
        for state in ("mine now", None):
            self.assertRaises(PresenceLimit, awareness.admit, "d", "c1", "s2", "mallory", state, 10, 10)
        awareness.admit("d", "c1", "s3", "alice", "back", 10, 10)
        awareness.update("d", "c1", None, 2, NOW, "s3", "alice")
        awareness.admit("d", "c1", "s2", "mallory", "free again", 10, 10)
