"""Latency statistics, and the bookkeeping that matches replies to requests by message id."""

from __future__ import annotations

import math
from typing import Optional, Sequence


def summary(samples_ms: Sequence[float]) -> dict[str, Optional[float]]:
    """count, min, max, mean, p50, p90, p99 (nearest rank), in ms; None for an empty sample."""
    ordered = sorted(samples_ms)
    n = len(ordered)
    if n == 0:
        return {"count": 0, "min": None, "max": None, "mean": None, "p50": None, "p90": None, "p99": None}

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * n) - 1)]

    return {
        "count": n,
        "min": round(ordered[0], 4),
        "max": round(ordered[-1], 4),
        "mean": round(sum(ordered) / n, 4),
        "p50": round(rank(50), 4),
        "p90": round(rank(90), 4),
        "p99": round(rank(99), 4),
    }


class Replies:
    """
    Requests sent, keyed by sequence number, and the replies that came back: latency of each,
    replies that overtook an earlier request's ("out of order"), requests never answered, and
    C{refused}: the replies that were errors, for callers that take an error as the reply.
    """

    def __init__(self) -> None:
        self.pending: dict[int, float] = {}
        self.latencies_ms: list[float] = []
        self.out_of_order = 0
        self.unexpected = 0
        self.refused = 0
        self._highest = -1

    def sent(self, seq: int, at: float) -> None:
        self.pending[seq] = at

    def received(self, seq: int, at: float) -> bool:
        """Record the reply to C{seq}; False if no such request was waiting (a duplicate or a stranger)."""
        started = self.pending.pop(seq, None)
        if started is None:
            self.unexpected += 1
            return False
        if seq < self._highest:
            self.out_of_order += 1
        self._highest = max(self._highest, seq)
        self.latencies_ms.append((at - started) * 1000)
        return True

    @property
    def missing(self) -> int:
        return len(self.pending)
