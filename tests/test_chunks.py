"""
Reassembly of ``delta_batch_chunk`` sets (docs/protocol.md, ``delta_batch_chunk``), with its limits, and the
lenient base64 decoding the chunks' data needs.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from synckit.chunks import ChunkAssembler, ChunkError, ChunkMemory, decode_base64


def chunk(chunk_id: str, total: Any, index: Any, data: bytes) -> dict[str, Any]:
    """A decoded chunk message, its data base64-encoded as a client sends it."""
    return {
        "type": "delta_batch_chunk",
        "id": f"{chunk_id}-{index}",
        "timestamp": 1,
        "chunkId": chunk_id,
        "totalChunks": total,
        "chunkIndex": index,
        "data": base64.b64encode(data).decode("ascii"),
    }


class ReassemblyTests(SynchronousTestCase):
    # Most tests use data whose length is a multiple of 3, so that its base64 has no padding and
    # they test reassembly alone; Base64Tests and test_padded_chunks cover padding.

    def test_padded_chunks(self) -> None:
        """Chunks of any length (padded base64, as every client sends) reassemble byte for byte."""
        assembler = ChunkAssembler()
        message = b'{"type":"delta_batch","id":"b1","timestamp":1,"documentId":"d","deltas":[]}'
        parts = [message[i : i + 7] for i in range(0, len(message), 7)]
        results = [assembler.add(chunk("c", len(parts), i, part), 0.0) for i, part in enumerate(parts)]
        self.assertEqual(results[:-1], [None] * (len(parts) - 1))
        self.assertEqual(results[-1], message)

    def test_single_chunk(self) -> None:
        """A set of one chunk is complete at once and leaves nothing behind."""
        assembler = ChunkAssembler()
        self.assertEqual(assembler.add(chunk("c", 1, 0, b"wholes"), 0.0), b"wholes")
        self.assertFalse(assembler)

    def test_index_order(self) -> None:
        """Chunks arriving out of order are joined in index order, once the last slot is filled."""
        assembler = ChunkAssembler()
        self.assertIsNone(assembler.add(chunk("c", 3, 2, b"3rd"), 0.0))
        self.assertIsNone(assembler.add(chunk("c", 3, 0, b"1st"), 0.0))
        self.assertTrue(assembler)
        self.assertEqual(assembler.add(chunk("c", 3, 1, b"2nd"), 0.0), b"1st2nd3rd")
        self.assertFalse(assembler)

    def test_repeated_index_overwrites(self) -> None:
        """A repeated index replaces the earlier data and does not count as a new slot."""
        assembler = ChunkAssembler()
        self.assertIsNone(assembler.add(chunk("c", 2, 0, b"old"), 0.0))
        self.assertIsNone(assembler.add(chunk("c", 2, 0, b"new"), 0.0))
        self.assertEqual(assembler.add(chunk("c", 2, 1, b"+ta"), 0.0), b"new+ta")

    def test_later_total_ignored(self) -> None:
        """Only the first chunk's totalChunks sizes the set."""
        assembler = ChunkAssembler()
        self.assertIsNone(assembler.add(chunk("c", 2, 0, b"aaa"), 0.0))
        self.assertEqual(assembler.add(chunk("c", 99, 1, b"bbb"), 0.0), b"aaabbb")

    def test_sets_are_independent(self) -> None:
        """Interleaved chunk ids are assembled separately; a finished id can start again."""
        assembler = ChunkAssembler()
        self.assertIsNone(assembler.add(chunk("x", 2, 0, b"x00"), 0.0))
        self.assertIsNone(assembler.add(chunk("y", 2, 1, b"y11"), 0.0))
        self.assertEqual(assembler.add(chunk("x", 2, 1, b"x11"), 0.0), b"x00x11")
        self.assertEqual(assembler.add(chunk("y", 2, 0, b"y00"), 0.0), b"y00y11")
        self.assertIsNone(assembler.add(chunk("x", 2, 0, b"again!"), 0.0))

    def test_empty_data(self) -> None:
        """An empty chunk still fills its slot."""
        assembler = ChunkAssembler()
        self.assertIsNone(assembler.add(chunk("c", 2, 0, b""), 0.0))
        self.assertEqual(assembler.add(chunk("c", 2, 1, b"zzz"), 0.0), b"zzz")


class LimitTests(SynchronousTestCase):
    def test_out_of_range_index(self) -> None:
        """Indexes outside 0..totalChunks-1, or not integers, are rejected; the set still completes."""
        assembler = ChunkAssembler()
        self.assertIsNone(assembler.add(chunk("c", 2, 0, b"aaa"), 0.0))
        for index in (-1, 2, 1000, "1", 1.0, True, None):
            self.assertRaises(ChunkError, assembler.add, chunk("c", 2, index, b"junk!!"), 0.0)
        self.assertEqual(assembler.add(chunk("c", 2, 1, b"bbb"), 0.0), b"aaabbb")

    def test_too_many_chunks(self) -> None:
        """totalChunks must be an integer from 1 to the cap; a rejected first chunk starts no set."""
        assembler = ChunkAssembler(max_chunks=5)
        for total in (6, 0, -1, "3", 3.0, True, None):
            self.assertRaises(ChunkError, assembler.add, chunk("c", total, 0, b"aaa"), 0.0)
            self.assertFalse(assembler)
        self.assertIsNone(assembler.add(chunk("c", 5, 0, b"aaa"), 0.0))

    def test_default_chunk_cap(self) -> None:
        """By default a set may have up to 1000 chunks, and no more."""
        self.assertRaises(ChunkError, ChunkAssembler().add, chunk("c", 1001, 0, b"aaa"), 0.0)
        self.assertIsNone(ChunkAssembler().add(chunk("c", 1000, 0, b"aaa"), 0.0))

    def test_oversize_set_dropped(self) -> None:
        """A set growing past max_bytes is rejected and dropped; its id then starts afresh."""
        assembler = ChunkAssembler(max_bytes=10)
        self.assertIsNone(assembler.add(chunk("c", 3, 0, b"123456"), 0.0))
        self.assertRaises(ChunkError, assembler.add, chunk("c", 3, 1, b"789012"), 0.0)
        self.assertFalse(assembler)
        self.assertEqual(assembler.add(chunk("c", 1, 0, b"fresh!"), 0.0), b"fresh!")

    def test_exactly_max_bytes(self) -> None:
        """A set of exactly max_bytes is accepted."""
        assembler = ChunkAssembler(max_bytes=9)
        self.assertIsNone(assembler.add(chunk("c", 2, 0, b"123"), 0.0))
        self.assertEqual(assembler.add(chunk("c", 2, 1, b"456789"), 0.0), b"123456789")

    def test_overwrite_counts_only_the_new_data(self) -> None:
        """An overwritten chunk's bytes no longer count toward the size limit."""
        assembler = ChunkAssembler(max_bytes=10)
        self.assertIsNone(assembler.add(chunk("c", 2, 0, b"123456789"), 0.0))
        self.assertIsNone(assembler.add(chunk("c", 2, 0, b"123"), 0.0))
        self.assertEqual(assembler.add(chunk("c", 2, 1, b"456789"), 0.0), b"123456789")

    def test_default_byte_cap(self) -> None:
        """By default a reassembled set may be 16 MiB, and no more."""
        assembler = ChunkAssembler()
        big = b"\0" * (8 * 1024 * 1024 - 2)
        self.assertIsNone(assembler.add(chunk("c", 3, 0, big), 0.0))
        self.assertIsNone(assembler.add(chunk("c", 3, 1, big), 0.0))
        self.assertRaises(ChunkError, assembler.add, chunk("c", 3, 2, b"!!!!!!"), 0.0)

    def test_fields_must_be_strings(self) -> None:
        """A chunkId or data that is not a string is rejected."""
        assembler = ChunkAssembler()
        for key, value in (("chunkId", 7), ("chunkId", None), ("data", None), ("data", ["YQ=="])):
            message = chunk("c", 1, 0, b"aaa")
            message[key] = value
            self.assertRaises(ChunkError, assembler.add, message, 0.0)
        self.assertFalse(assembler)


class ExpiryTests(SynchronousTestCase):
    def test_default_timeout(self) -> None:
        """Sets expire 30 s after their first chunk by default."""
        self.assertEqual(ChunkAssembler().timeout, 30.0)

    def test_expire_drops_only_old_sets(self) -> None:
        """expire() drops sets whose first chunk is more than the timeout old, and counts them."""
        assembler = ChunkAssembler(timeout=30.0)
        assembler.add(chunk("old", 2, 0, b"aaa"), 100.0)
        assembler.add(chunk("new", 2, 0, b"aaa"), 110.0)
        self.assertEqual(assembler.expire(130.0), 0)
        self.assertEqual(assembler.expire(130.5), 1)
        # "new" survived: completing it works.
        self.assertEqual(assembler.add(chunk("new", 2, 1, b"bbb"), 131.0), b"aaabbb")
        self.assertFalse(assembler)

    def test_expired_set_starts_afresh(self) -> None:
        """After expiry, a late chunk of the old set begins a new, incomplete set."""
        assembler = ChunkAssembler(timeout=30.0)
        assembler.add(chunk("c", 2, 0, b"aaa"), 0.0)
        self.assertEqual(assembler.expire(31.0), 1)
        self.assertFalse(assembler)
        self.assertIsNone(assembler.add(chunk("c", 2, 1, b"bbb"), 31.0))

    def test_age_from_first_chunk(self) -> None:
        """Later chunks do not refresh a set's age."""
        assembler = ChunkAssembler(timeout=30.0)
        assembler.add(chunk("c", 3, 0, b"aaa"), 0.0)
        assembler.add(chunk("c", 3, 1, b"bbb"), 29.0)
        self.assertEqual(assembler.expire(30.5), 1)
        self.assertFalse(assembler)

    def test_expire_empty(self) -> None:
        """Expiring with no sets drops nothing."""
        self.assertEqual(ChunkAssembler().expire(1e9), 0)


class Base64Tests(SynchronousTestCase):
    def test_standard(self) -> None:
        """Standard padded base64 decodes."""
        self.assertEqual(decode_base64("aGVsbG8gd29ybGQ="), b"hello world")

    def test_missing_padding(self) -> None:
        """Padding may be left out."""
        self.assertEqual(decode_base64("aGVsbG8"), b"hello")
        self.assertEqual(decode_base64("aGVsbA"), b"hell")
        self.assertEqual(decode_base64("YQ"), b"a")

    def test_url_safe_alphabet(self) -> None:
        """The URL-safe alphabet (``-`` and ``_``) decodes as ``+`` and ``/``."""
        data = bytes([0xFB, 0xFF, 0xBF, 0xFE])
        self.assertEqual(decode_base64(base64.urlsafe_b64encode(data).decode().rstrip("=")), data)
        self.assertEqual(decode_base64("-_-_"), decode_base64("+/+/"))
        self.assertEqual(decode_base64("-_-_"), bytes([0xFB, 0xFF, 0xBF]))

    def test_junk_ignored(self) -> None:
        """Whitespace and characters outside the alphabet are skipped."""
        self.assertEqual(decode_base64(" aGVs\nbG8=\r\n"), b"hello")
        self.assertEqual(decode_base64("aG*Vs!bG8"), b"hello")

    def test_stray_single_character(self) -> None:
        """A dangling sixth bit group (length 1 mod 4) is dropped, not an error."""
        self.assertEqual(decode_base64("aGVsbG8gA"), b"hello ")

    def test_empty(self) -> None:
        """Empty or all-junk input decodes to no bytes."""
        self.assertEqual(decode_base64(""), b"")
        self.assertEqual(decode_base64("!!==="), b"")
        self.assertEqual(decode_base64("é"), b"")

    def test_round_trip(self) -> None:
        """Every byte value survives encoding and lenient decoding, in both alphabets."""
        data = bytes(range(256))
        self.assertEqual(decode_base64(base64.b64encode(data).decode()), data)
        self.assertEqual(decode_base64(base64.urlsafe_b64encode(data).decode()), data)


class ChunkMemoryTests(SynchronousTestCase):
    def test_shared_between_assemblers(self) -> None:
        """Two assemblers sharing a ChunkMemory count against one cap: the set that goes over it is dropped."""
        memory = ChunkMemory(10)
        first, second = ChunkAssembler(memory=memory), ChunkAssembler(memory=memory)
        self.assertIsNone(first.add(chunk("a", 2, 0, b"123456"), 0))
        self.assertEqual(memory.used, 6)
        self.assertRaises(ChunkError, second.add, chunk("b", 2, 0, b"123456"), 0)
        self.assertEqual(memory.used, 6)
        self.assertFalse(second)

    def test_completion_expiry_and_clear_give_back(self) -> None:
        """Bytes return to the shared cap when a set completes, expires, or its connection is cleared."""
        memory = ChunkMemory(100)
        assembler = ChunkAssembler(memory=memory, timeout=30)
        assembler.add(chunk("a", 2, 0, b"123"), 0)
        self.assertEqual(assembler.add(chunk("a", 2, 1, b"456"), 0), b"123456")
        assembler.add(chunk("b", 2, 0, b"123"), 0)
        assembler.expire(31)
        assembler.add(chunk("c", 2, 0, b"123"), 40)
        assembler.add(chunk("d", 2, 0, b"123"), 40)
        self.assertEqual(memory.used, 6)
        assembler.clear()
        self.assertEqual((memory.used, bool(assembler)), (0, False))
