"""
Reassembly of ``delta_batch_chunk`` messages into the message they were cut from
(docs/protocol.md, ``delta_batch_chunk``), with the limits the reference lacks, so that chunks
cannot be used to make the server hold unbounded memory: a bounded number of chunks
and bytes per set, in-range indexes only, sets dropped when they are not complete in time, and a
cap on the bytes all connections' sets hold together (L{ChunkMemory}).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Optional

_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def decode_base64(data: str) -> bytes:
    """Decode leniently, as Node does: URL-safe alphabet, junk characters and missing padding."""
    raw = data.encode("ascii", "ignore").replace(b"-", b"+").replace(b"_", b"/")
    raw = _NOT_BASE64.sub(b"", raw)
    if len(raw) % 4 == 1:
        raw = raw[:-1]  # a lone trailing character carries no whole byte
    raw += b"=" * (-len(raw) % 4)
    try:
        return base64.b64decode(raw)
    except binascii.Error:
        return b""


class ChunkError(ValueError):
    """A chunk that cannot belong to a valid set."""


class ChunkMemory:
    """
    The bytes of unfinished chunk sets held by every connection of a server, against one cap.
    Each connection's own cap bounds what one client can hold, not what many can: twenty
    connections each filling theirs held 280 MB for a minute.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class _ChunkSet:
    __slots__ = ("total", "parts", "started")

    def __init__(self, total: int, started: float) -> None:
        self.total = total
        #: index -> bytes, filled as chunks arrive: a set announcing 1000 chunks costs nothing
        #: until they come.
        self.parts: dict[int, bytes] = {}
        self.started = started


class ChunkAssembler:
    """
    One connection's incomplete chunk sets.  Chunks bypass the rate limit (as in the reference),
    so what one connection may hold is bounded here: a few open sets and a byte budget shared by
    all of them, and, when given, the server's L{ChunkMemory} shared with every other connection.
    """

    def __init__(
        self,
        max_chunks: int = 1000,
        max_bytes: int = 16 * 1024 * 1024,
        max_sets: int = 16,
        timeout: float = 30.0,
        memory: Optional[ChunkMemory] = None,
    ) -> None:
        self._max_chunks = max_chunks
        self._max_bytes = max_bytes
        self._max_sets = max_sets
        self.timeout = timeout
        self._memory = memory
        self._sets: dict[str, _ChunkSet] = {}
        self._buffered = 0

    def __bool__(self) -> bool:
        return bool(self._sets)

    def add(self, message: dict[str, Any], now: float) -> Optional[bytes]:
        """
        Store one chunk; returns the reassembled message bytes once every chunk is in.

        @raise ChunkError: for a chunk outside the limits (a set over a byte budget is dropped).
        """
        chunk_id, total, index, data = (message.get(k) for k in ("chunkId", "totalChunks", "chunkIndex", "data"))
        if not isinstance(chunk_id, str) or not isinstance(data, str):
            raise ChunkError("chunkId and data must be strings")
        chunk_set = self._sets.get(chunk_id)
        if chunk_set is None:
            if type(total) is not int or not 0 < total <= self._max_chunks:
                raise ChunkError(f"totalChunks must be an integer from 1 to {self._max_chunks}")
            if len(self._sets) >= self._max_sets:
                raise ChunkError(f"more than {self._max_sets} chunk sets open at once")
            chunk_set = self._sets[chunk_id] = _ChunkSet(total, now)
        if type(index) is not int or not 0 <= index < chunk_set.total:
            raise ChunkError("chunkIndex out of range")
        part = decode_base64(data)
        self._account(len(part) - len(chunk_set.parts.get(index, b"")))
        chunk_set.parts[index] = part
        if self._buffered > self._max_bytes:
            self._drop(chunk_id)
            raise ChunkError(f"chunk sets exceed {self._max_bytes} bytes")
        memory = self._memory
        if memory is not None and memory.used > memory.limit:
            self._drop(chunk_id)
            raise ChunkError(f"all connections' chunk sets exceed {memory.limit} bytes")
        if len(chunk_set.parts) < chunk_set.total:
            return None
        self._drop(chunk_id)
        return b"".join(chunk_set.parts[i] for i in range(chunk_set.total))

    def _account(self, size: int) -> None:
        self._buffered += size
        if self._memory is not None:
            self._memory.used += size

    def _drop(self, chunk_id: str) -> None:
        chunk_set = self._sets.pop(chunk_id)
        self._account(-sum(len(p) for p in chunk_set.parts.values()))

    def expire(self, now: float) -> int:
        """Drop sets whose first chunk is older than the timeout; returns how many."""
        stale = [k for k, s in self._sets.items() if now - s.started > self.timeout]
        for chunk_id in stale:
            self._drop(chunk_id)
        return len(stale)

    def clear(self) -> None:
        """Drop every set (the connection is gone), giving their bytes back to the shared cap."""
        for chunk_id in list(self._sets):
            self._drop(chunk_id)
