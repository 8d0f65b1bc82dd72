"""
Reassembly of ``delta_batch_chunk`` messages into the message they were cut from
(PROTOCOL.md section 4.10), with the limits the reference lacks (R-5): a bounded number of chunks
and bytes per set, in-range indexes only, and sets dropped when they are not complete in time.
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


class _ChunkSet:
    __slots__ = ("parts", "missing", "size", "started")

    def __init__(self, total: int, started: float) -> None:
        self.parts: list[Optional[bytes]] = [None] * total
        self.missing = total
        self.size = 0
        self.started = started


class ChunkAssembler:
    """One connection's incomplete chunk sets."""

    def __init__(self, max_chunks: int = 1000, max_bytes: int = 16 * 1024 * 1024, timeout: float = 30.0) -> None:
        self._max_chunks = max_chunks
        self._max_bytes = max_bytes
        self.timeout = timeout
        self._sets: dict[str, _ChunkSet] = {}

    def __bool__(self) -> bool:
        return bool(self._sets)

    def add(self, message: dict[str, Any], now: float) -> Optional[bytes]:
        """
        Store one chunk; returns the reassembled message bytes once every chunk is in.

        @raise ChunkError: for a chunk outside the limits (its set is dropped).
        """
        chunk_id, total, index, data = (message.get(k) for k in ("chunkId", "totalChunks", "chunkIndex", "data"))
        if not isinstance(chunk_id, str) or not isinstance(data, str):
            raise ChunkError("chunkId and data must be strings")
        chunk_set = self._sets.get(chunk_id)
        if chunk_set is None:
            if type(total) is not int or not 0 < total <= self._max_chunks:
                raise ChunkError(f"totalChunks must be an integer from 1 to {self._max_chunks}")
            chunk_set = self._sets[chunk_id] = _ChunkSet(total, now)
        if type(index) is not int or not 0 <= index < len(chunk_set.parts):
            raise ChunkError("chunkIndex out of range")
        part = decode_base64(data)
        previous = chunk_set.parts[index]
        if previous is None:
            chunk_set.missing -= 1
        chunk_set.size += len(part) - (len(previous) if previous is not None else 0)
        if chunk_set.size > self._max_bytes:
            del self._sets[chunk_id]
            raise ChunkError(f"chunk set exceeds {self._max_bytes} bytes")
        chunk_set.parts[index] = part
        if chunk_set.missing:
            return None
        del self._sets[chunk_id]
        return b"".join(chunk_set.parts)  # type: ignore[arg-type]

    def expire(self, now: float) -> int:
        """Drop sets whose first chunk is older than the timeout; returns how many."""
        stale = [k for k, s in self._sets.items() if now - s.started > self.timeout]
        for chunk_id in stale:
            del self._sets[chunk_id]
        return len(stale)
