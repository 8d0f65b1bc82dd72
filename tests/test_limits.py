"""
The per-connection message rate limit and the connection limits (docs/protocol.md sections 1 and 3).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from synckit.limits import ConnectionLimiter, RateLimiter

T0 = 1_700_000_000.0


class RateLimiterTests(SynchronousTestCase):
    def test_exactly_limit_allowed(self) -> None:
        """Within one window exactly C{limit} messages are allowed; the next is refused."""
        limiter = RateLimiter(5)
        self.assertEqual([limiter.allow(T0) for _ in range(6)], [True] * 5 + [False])

    def test_limit_spread_over_window(self) -> None:
        """Messages spread over the minute count together; the limit holds until the first falls out."""
        limiter = RateLimiter(3)
        for offset in (0, 20, 40):
            self.assertTrue(limiter.allow(T0 + offset))
        self.assertFalse(limiter.allow(T0 + 59))
        self.assertFalse(limiter.allow(T0 + 59.999))

    def test_window_slides_after_60_seconds(self) -> None:
        """A message stops counting 60 s after it was accepted, freeing one slot."""
        limiter = RateLimiter(2)
        self.assertTrue(limiter.allow(T0))
        self.assertTrue(limiter.allow(T0 + 10))
        self.assertFalse(limiter.allow(T0 + 59))
        self.assertTrue(limiter.allow(T0 + 60))
        self.assertFalse(limiter.allow(T0 + 60))

    def test_window_slides_partially(self) -> None:
        """Slots free one by one as each accepted message ages out, not all at once."""
        limiter = RateLimiter(3)
        for offset in (0, 20, 40):
            self.assertTrue(limiter.allow(T0 + offset))
        self.assertTrue(limiter.allow(T0 + 60))  # the message at 0 left
        self.assertFalse(limiter.allow(T0 + 70))  # 20, 40 and 60 still count
        self.assertTrue(limiter.allow(T0 + 80))  # the message at 20 left
        self.assertFalse(limiter.allow(T0 + 99))
        self.assertTrue(limiter.allow(T0 + 100))

    def test_rejected_not_counted(self) -> None:
        """Refused messages are not recorded, so a refused burst does not extend the block."""
        limiter = RateLimiter(2)
        self.assertTrue(limiter.allow(T0))
        self.assertTrue(limiter.allow(T0))
        for _ in range(100):
            self.assertFalse(limiter.allow(T0 + 30))
        self.assertTrue(limiter.allow(T0 + 60))
        self.assertTrue(limiter.allow(T0 + 60))
        self.assertFalse(limiter.allow(T0 + 60))

    def test_many_in_one_second(self) -> None:
        """A large limit is reached exactly, however many messages share a second."""
        limiter = RateLimiter(10_000)
        allowed = sum(limiter.allow(T0 + i / 20_000) for i in range(20_000))
        self.assertEqual(allowed, 10_000)

    def test_idle_connection_starts_fresh(self) -> None:
        """After a quiet minute the whole limit is available again."""
        limiter = RateLimiter(3)
        for offset in range(3):
            self.assertTrue(limiter.allow(T0 + offset))
        self.assertEqual([limiter.allow(T0 + 3600) for _ in range(4)], [True, True, True, False])

    def test_custom_window(self) -> None:
        """The window length is a parameter."""
        limiter = RateLimiter(1, window=10)
        self.assertTrue(limiter.allow(T0))
        self.assertFalse(limiter.allow(T0 + 9))
        self.assertTrue(limiter.allow(T0 + 10))


class ConnectionLimiterTests(SynchronousTestCase):
    PER_IP = "Too many connections from your IP"
    TOTAL = "Server at maximum capacity"

    def test_per_ip_limit(self) -> None:
        """An address may hold C{per_ip} connections; the next gets the per-IP reason."""
        limiter = ConnectionLimiter(per_ip=2, total=100)
        self.assertIsNone(limiter.admit("10.0.0.1"))
        self.assertIsNone(limiter.admit("10.0.0.1"))
        self.assertEqual(limiter.admit("10.0.0.1"), self.PER_IP)
        self.assertIsNone(limiter.admit("10.0.0.2"))
        self.assertEqual(limiter.total, 3)

    def test_total_limit(self) -> None:
        """Once C{total} connections are open, a new address gets the capacity reason."""
        limiter = ConnectionLimiter(per_ip=10, total=2)
        self.assertIsNone(limiter.admit("a"))
        self.assertIsNone(limiter.admit("b"))
        self.assertEqual(limiter.admit("c"), self.TOTAL)
        self.assertEqual(limiter.total, 2)

    def test_per_ip_checked_first(self) -> None:
        """When both limits are reached, the per-IP reason wins."""
        limiter = ConnectionLimiter(per_ip=1, total=1)
        self.assertIsNone(limiter.admit("a"))
        self.assertEqual(limiter.admit("a"), self.PER_IP)
        self.assertEqual(limiter.admit("b"), self.TOTAL)

    def test_refused_not_counted(self) -> None:
        """Refused connections take no slot: one release is enough to admit again."""
        limiter = ConnectionLimiter(per_ip=1, total=2)
        self.assertIsNone(limiter.admit("a"))
        self.assertIsNone(limiter.admit("b"))
        for _ in range(5):
            self.assertIsNotNone(limiter.admit("a"))
            self.assertIsNotNone(limiter.admit("c"))
        self.assertEqual(limiter.total, 2)
        limiter.release("b")
        self.assertIsNone(limiter.admit("c"))

    def test_release_frees_per_ip_slot(self) -> None:
        """Releasing a connection lets the same address connect again."""
        limiter = ConnectionLimiter(per_ip=1, total=10)
        self.assertIsNone(limiter.admit("a"))
        self.assertEqual(limiter.admit("a"), self.PER_IP)
        limiter.release("a")
        self.assertEqual(limiter.total, 0)
        self.assertIsNone(limiter.admit("a"))

    def test_release_frees_total_slot(self) -> None:
        """Releasing a connection lets a different address in under the total cap."""
        limiter = ConnectionLimiter(per_ip=5, total=2)
        self.assertIsNone(limiter.admit("a"))
        self.assertIsNone(limiter.admit("a"))
        self.assertEqual(limiter.admit("b"), self.TOTAL)
        limiter.release("a")
        self.assertEqual(limiter.total, 1)
        self.assertIsNone(limiter.admit("b"))

    def test_release_counts_per_address(self) -> None:
        """Releasing one of an address's connections leaves the others counted."""
        limiter = ConnectionLimiter(per_ip=2, total=10)
        self.assertIsNone(limiter.admit("a"))
        self.assertIsNone(limiter.admit("a"))
        limiter.release("a")
        self.assertIsNone(limiter.admit("a"))
        self.assertEqual(limiter.admit("a"), self.PER_IP)
