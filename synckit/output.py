"""
Output batching: what one piece of work writes to connections leaves at its end, each
connection's frames together.

Twisted's transports buffer every write until the reactor's next turn, then register the socket
for writability, wait for the poll to say so, send, and unregister: two C{epoll_ctl} calls, a
poll wake-up and the reactor's dispatch for every connection that got anything.  For a server
whose replies are a few hundred bytes that is most of the cost of a round trip (docs/
performance.md).  Instead, while a batch runs (the messages of one read, one broadcast flush)
each connection holds its frames; when the batch ends it writes them in one C{send}, straight to
its socket when nothing of its own is still waiting in the transport, and through the transport
otherwise.  A lone write outside any batch goes out the same way, at once.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper

from synckit.upgrade import Routed


class Held(Protocol):
    """A connection holding frames until the batch it was written in ends."""

    def release(self) -> None: ...


class OutputBatch:
    """
    A reentrant context manager: the outermost exit releases every connection that held
    frames, in the order each first held one.  Frames are held only while it is active.
    """

    _log = Logger()

    def __init__(self) -> None:
        self._depth = 0
        self._held: list[Held] = []

    @property
    def active(self) -> bool:
        return self._depth > 0

    def hold(self, connection: Held) -> None:
        """C{connection} holds frames now; release it when the outermost batch ends."""
        self._held.append(connection)

    def __enter__(self) -> "OutputBatch":
        self._depth += 1
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._depth -= 1
        if self._depth:
            return
        held, self._held = self._held, []
        for connection in held:
            try:
                connection.release()  # anything it sends meanwhile is outside the batch: at once
            except Exception:
                # One connection's failure must not keep the others' replies from them.
                self._log.failure("sending to {connection} failed", connection=connection)


def plain_socket(transport: Any) -> Optional[tcp.Connection]:
    """
    The socket transport under C{transport} if writes reach it unchanged: Twisted's own TCP or
    Unix transport, without TLS (C{writeSomeData} would bypass the encryption), or under the
    port's L{Routed} wrapper, which only forwards.  C{None} for anything else (TLS endpoints,
    test transports), which is written to as it is.
    """
    if isinstance(transport, Routed):
        transport = transport.transport
    if isinstance(transport, tcp.Connection) and not transport.TLS:
        return transport
    return None


def backlog(transport: Any) -> Optional[int]:
    """
    The bytes the socket under C{transport} holds unsent: through the port's L{Routed} wrapper
    and TLS (which encrypts what it is given at once and hands it down, but for what is written
    before its handshake ends), down to Twisted's socket transport.  C{None} when there is no
    such socket (test transports).
    """
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    if isinstance(transport, tcp.Connection):
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return None


def write_now(transport: tcp.Connection, data: bytes) -> None:
    """
    Write C{data} to a L{plain_socket}: straight to its socket if nothing is waiting in
    its buffer, the rest (or all of it, when something is) through the buffer.
    C{writeSomeData} is the transport's own "send what the kernel takes now"; with the buffer
    empty, nothing written earlier can be overtaken.
    """
    if transport.connected and not transport.disconnecting and not transport._tempDataLen:
        if transport.offset == len(transport.dataBuffer):
            sent = transport.writeSomeData(data)
            if isinstance(sent, int):
                if sent == len(data):
                    return
                data = data[sent:]
            # Otherwise the connection is lost: the transport's write path finds that out and
            # closes it the usual way.
    transport.write(data)
