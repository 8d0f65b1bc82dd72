"""
Connection and message limits (docs/protocol.md sections 1 and 3; docs/security.md), and who the
client is when it comes through a reverse proxy.

The reference re-scans a list of timestamps on every message, which is O(n) in the limit; ours
counts accepted messages in one-second buckets over a sliding minute: O(1) per message and at most
61 small buckets per connection, whatever the limit.
"""

from __future__ import annotations

import ipaddress
from typing import Optional, Sequence, Union

from synckit.config import IPNetwork


#: The address of every client of a unix socket: its peers have no address of their own, and
#: C{trusted-proxies} names them all with this word (a proxy in front of the socket).
UNIX_PEER = "unix"


def is_trusted(address: str, proxies: Sequence[Union[IPNetwork, str]]) -> bool:
    """
    Whether C{address} is in one of C{proxies}; an IPv4 address mapped into IPv6 counts as IPv4,
    and a unix socket's peer is trusted when C{proxies} holds L{UNIX_PEER}.
    """
    if not proxies:
        return False  # the usual case, without parsing the address (per connection)
    if address == UNIX_PEER:
        return UNIX_PEER in proxies
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in proxies if not isinstance(network, str))


def forwarded_client(
    peer: str, forwarded_for: Optional[str], real_ip: Optional[str], proxies: Sequence[Union[IPNetwork, str]]
) -> str:
    """
    The client's address.  Headers are believed only from a trusted proxy, as anyone can send
    them: otherwise a client picks its own address, escapes the per-address limits and can
    have another address locked out.  From a trusted proxy, it is the right-most
    C{X-Forwarded-For} entry that is not itself a trusted proxy (each proxy appends the address
    it saw, so entries to its left are the client's to write), else C{X-Real-IP}.
    """
    if not proxies or not is_trusted(peer, proxies):
        return peer
    hops = [hop.strip() for hop in (forwarded_for or "").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, proxies):
            return hop
    if hops:
        return hops[0]
    return real_ip.strip() if real_ip and real_ip.strip() else peer


class RateLimiter:
    """At most C{limit} accepted messages in any sliding C{window} seconds, for one connection."""

    __slots__ = ("_limit", "_window", "_buckets", "_total")

    def __init__(self, limit: int, window: int = 60) -> None:
        self._limit = limit
        self._window = window
        # [second, count], oldest first; a list, as it is short and most connections are idle.
        self._buckets: list[list[int]] = []
        self._total = 0

    def allow(self, now: float) -> bool:
        """Record a message at C{now} (seconds) if it is within the limit; rejected ones are not."""
        second = int(now)
        buckets = self._buckets
        cutoff = second - self._window
        while buckets and buckets[0][0] <= cutoff:
            self._total -= buckets.pop(0)[1]
        if self._total >= self._limit:
            return False
        self._total += 1
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += 1
        else:
            buckets.append([second, 1])
        return True


class ConnectionLimiter:
    """Open connections, per client address and in all."""

    def __init__(self, per_ip: int, total: int) -> None:
        self._per_ip = per_ip
        self._total_cap = total
        self._by_ip: dict[str, int] = {}
        self.total = 0

    def admit(self, ip: str) -> str | None:
        """
        Count a new connection from C{ip}; returns C{None}, or the close reason if it is over a
        limit (the per-address limit is checked first, as in the reference).
        """
        if self._by_ip.get(ip, 0) >= self._per_ip:
            return "Too many connections from your IP"
        if self.total >= self._total_cap:
            return "Server at maximum capacity"
        self._by_ip[ip] = self._by_ip.get(ip, 0) + 1
        self.total += 1
        return None

    def release(self, ip: str) -> None:
        count = self._by_ip.get(ip, 0) - 1
        if count > 0:
            self._by_ip[ip] = count
        else:
            self._by_ip.pop(ip, None)
        self.total -= 1
