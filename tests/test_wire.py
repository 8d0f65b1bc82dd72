"""
The wire codec (docs/protocol.md section 2): binary and JSON decoding, frame encoding, size checks
and message ids, plus fuzzing that no input makes the decoder fail in an unexpected way.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from synckit import wire

#: table 2.2, copied from the protocol rather than from the module under test
PROTOCOL_CODES = {
    "auth": 0x01,
    "auth_success": 0x02,
    "auth_error": 0x03,
    "subscribe": 0x10,
    "unsubscribe": 0x11,
    "sync_request": 0x12,
    "sync_response": 0x13,
    "sync_step1": 0x14,
    "sync_step2": 0x15,
    "delta": 0x20,
    "ack": 0x21,
    "delta_batch_chunk": 0x23,
    "ping": 0x30,
    "pong": 0x31,
    "awareness_update": 0x40,
    "awareness_subscribe": 0x41,
    "awareness_state": 0x42,
    "delta_batch": 0x50,
    "error": 0xFF,
}


def message_of(f: wire.Frame) -> dict:
    """The frame's message as a client decodes it."""
    return {"type": f.type, "timestamp": f.timestamp, **f.body}

TS = 1_700_000_000_123


def frame(code: int, payload: bytes, timestamp: int = TS, length: Optional[int] = None) -> bytes:
    """A binary frame with raw payload bytes; C{length} overrides the declared payload length."""
    return struct.pack(">BqI", code, timestamp, len(payload) if length is None else length) + payload


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


class IdSource:
    """A C{new_id} that records how often it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return f"generated-{self.calls}"


def decode(data: bytes) -> wire.Message:
    return wire.decode(data, IdSource())


class BinaryDecodeTests(SynchronousTestCase):
    def test_type_codes_match_the_protocol(self) -> None:
        """The codec's type-code table is exactly table 2.2 (delta_batch is 0x50, not 0x22)."""
        self.assertEqual(wire.TYPE_CODES, PROTOCOL_CODES)
        self.assertEqual(wire.CODE_TYPES, {v: k for k, v in PROTOCOL_CODES.items()})

    def test_header_is_big_endian_type_timestamp_length(self) -> None:
        """Type comes from the code, timestamp from the signed big-endian i64, members from the payload."""
        for name, code in PROTOCOL_CODES.items():
            message = decode(frame(code, b'{"id":"m1","documentId":"d"}', timestamp=-5))
            self.assertEqual(message, {"type": name, "id": "m1", "timestamp": -5, "documentId": "d"})

    def test_length_counts_utf8_bytes(self) -> None:
        """The declared length is the payload's UTF-8 byte count, so non-ASCII values decode whole."""
        payload = dumps({"id": "u", "value": "héllo € 😀 日本"})
        self.assertGreater(len(payload), len(payload.decode("utf-8")))
        message = decode(frame(0x20, payload))
        self.assertEqual(message["value"], "héllo € 😀 日本")

    def test_length_in_characters_is_short(self) -> None:
        """A length that counts characters instead of bytes cuts the JSON short: rejected."""
        payload = dumps({"id": "u", "value": "ééé"})
        data = frame(0x20, payload, length=len(payload.decode("utf-8")))
        self.assertRaises(wire.DecodeError, decode, data)

    def test_bytes_after_payload_ignored(self) -> None:
        """Anything after 13 + length bytes is ignored, even if it is not JSON."""
        payload = b'{"id":"a","n":1}'
        message = decode(frame(0x30, payload) + b"\xff\x00garbage}")
        self.assertEqual(message, {"type": "ping", "id": "a", "timestamp": TS, "n": 1})

    def test_shorter_than_header(self) -> None:
        """Every message of fewer than 13 bytes (the empty message included) is rejected."""
        whole = frame(0x30, b"{}")
        for size in range(wire.HEADER_SIZE):
            self.assertRaises(wire.DecodeError, decode, whole[:size])

    def test_short_payload(self) -> None:
        """A frame with fewer payload bytes than its header declares is rejected."""
        payload = b'{"id":"a"}'
        self.assertRaises(wire.DecodeError, decode, frame(0x30, payload, length=len(payload) + 1))
        self.assertRaises(wire.DecodeError, decode, frame(0x30, b"", length=2**32 - 1))

    def test_unknown_type_code(self) -> None:
        """Type codes outside table 2.2 (0x22 included) are rejected."""
        for code in (0x00, 0x04, 0x22, 0x24, 0x51, 0x7A, 0xFE):
            self.assertRaises(wire.DecodeError, decode, frame(code, b'{"id":"a"}'))

    def test_invalid_json(self) -> None:
        """A payload that is not JSON, or is empty, is rejected."""
        for payload in (b"{", b'{"id":}', b"nope", b"", b"{'id':'a'}", b'{"a":NaN}'):
            self.assertRaises(wire.DecodeError, decode, frame(0x30, payload))

    def test_non_object_payload(self) -> None:
        """A payload that is valid JSON but not an object is rejected."""
        for payload in (b"[1,2]", b'"id"', b"42", b"true", b"[]"):
            self.assertRaises(wire.DecodeError, decode, frame(0x30, payload))

    def test_payload_id_and_timestamp_override_header(self) -> None:
        """Payload members override the generated id and the header timestamp."""
        ids = IdSource()
        message = wire.decode(frame(0x20, b'{"id":"client-1","timestamp":42}', timestamp=TS), ids)
        self.assertEqual(message["id"], "client-1")
        self.assertEqual(message["timestamp"], 42)
        self.assertEqual(ids.calls, 0)

    def test_payload_type_ignored(self) -> None:
        """A payload ``type`` never replaces the type from the header code."""
        message = decode(frame(0x30, b'{"id":"a","type":"auth"}'))
        self.assertEqual(message["type"], "ping")

    def test_generated_id_when_payload_has_none(self) -> None:
        """Without a payload id, the message gets exactly one freshly generated id."""
        ids = IdSource()
        message = wire.decode(frame(0x10, b'{"documentId":"d"}'), ids)
        self.assertEqual(message["id"], "generated-1")
        self.assertEqual(ids.calls, 1)
        self.assertEqual(message["timestamp"], TS)

    def test_nested_payload_not_flattened(self) -> None:
        """On the binary path a ``payload`` member stays as it is (flattening is JSON-only)."""
        message = decode(frame(0x20, b'{"id":"a","payload":{"x":1,"id":"b"}}'))
        self.assertEqual(message["payload"], {"x": 1, "id": "b"})
        self.assertEqual(message["id"], "a")
        self.assertNotIn("x", message)

    def test_invalid_utf8_replaced(self) -> None:
        """Invalid UTF-8 in the payload becomes U+FFFD, as Node's Buffer.toString does."""
        message = decode(frame(0x20, b'{"id":"a","v":"x\xffy\xc3"}'))
        self.assertEqual(message["v"], "x\ufffdy\ufffd")

    def test_leading_whitespace_is_not_json(self) -> None:
        """Whitespace before ``{`` (or a leading ``[``) sends the message down the binary path, where it fails."""
        body = b'{"type":"ping","id":"a","timestamp":1}'
        for data in (b" " + body, b"\n" + body, b"\t" + body, b"\xef\xbb\xbf" + body, b"[" + body + b"]"):
            self.assertRaises(wire.DecodeError, decode, data)


class JsonDecodeTests(SynchronousTestCase):
    def test_plain_message(self) -> None:
        """A JSON object with type, id and timestamp decodes to itself."""
        obj = {"type": "delta", "id": "msg-1", "timestamp": 1767268800000, "documentId": "doc-1", "delta": {"t": "x"}}
        self.assertEqual(decode(dumps(obj)), obj)

    def test_json_never_generates_an_id(self) -> None:
        """The JSON path takes the id from the message and never calls C{new_id}."""
        ids = IdSource()
        wire.decode(b'{"type":"ping","id":"a","timestamp":1}', ids)
        self.assertEqual(ids.calls, 0)

    def test_required_members(self) -> None:
        """A missing type, id or timestamp is rejected."""
        for missing in ("type", "id", "timestamp"):
            obj = {"type": "ping", "id": "a", "timestamp": 1}
            del obj[missing]
            self.assertRaises(wire.DecodeError, decode, dumps(obj))

    def test_falsy_required_members(self) -> None:
        """Falsy values are rejected: timestamp 0, id "", type "", null and false."""
        for key, value in (
            ("timestamp", 0),
            ("timestamp", 0.0),
            ("id", ""),
            ("id", 0),
            ("type", ""),
            ("type", None),
            ("timestamp", False),
            ("id", None),
        ):
            obj: dict[str, Any] = {"type": "ping", "id": "a", "timestamp": 1, key: value}
            self.assertRaises(wire.DecodeError, decode, dumps(obj))

    def test_required_members_use_javascript_truthiness(self) -> None:
        """
        The check is JavaScript truthiness (docs/protocol.md section 2): an empty array or object is truthy there,
        so a message whose id or timestamp is ``[]`` or ``{}`` is accepted.
        """
        for key, value in (("id", []), ("timestamp", {}), ("id", {})):
            obj: dict[str, Any] = {"type": "ping", "id": "a", "timestamp": 1, key: value}
            self.assertEqual(decode(dumps(obj))[key], value)

    def test_required_members_checked_before_flattening(self) -> None:
        """Type, id and timestamp inside ``payload`` do not satisfy the top-level check."""
        obj = {"type": "ping", "payload": {"id": "a", "timestamp": 1}}
        self.assertRaises(wire.DecodeError, decode, dumps(obj))
        obj = {"id": "a", "timestamp": 1, "payload": {"type": "ping"}}
        self.assertRaises(wire.DecodeError, decode, dumps(obj))

    def test_payload_flattened(self) -> None:
        """Payload members overlay the top level; ``payload`` itself disappears."""
        obj = {"type": "delta", "id": "a", "timestamp": 1, "documentId": "top", "payload": {"documentId": "d", "x": 2}}
        self.assertEqual(decode(dumps(obj)), {"type": "delta", "id": "a", "timestamp": 1, "documentId": "d", "x": 2})

    def test_payload_overrides_id_and_timestamp_but_not_type(self) -> None:
        """Payload id and timestamp win over the top level; payload type is dropped, top-level type kept."""
        obj = {"type": "delta", "id": "a", "timestamp": 1, "payload": {"type": "auth", "id": "b", "timestamp": 9}}
        self.assertEqual(decode(dumps(obj)), {"type": "delta", "id": "b", "timestamp": 9})

    def test_array_payload_flattened_by_index(self) -> None:
        """An array ``payload`` counts as an object: its members are keyed "0", "1", ..."""
        obj = {"type": "ping", "id": "a", "timestamp": 1, "payload": ["x", None]}
        self.assertEqual(decode(dumps(obj)), {"type": "ping", "id": "a", "timestamp": 1, "0": "x", "1": None})

    def test_scalar_payload_kept(self) -> None:
        """A ``payload`` that is neither object nor array is an ordinary member."""
        for value in ("s", 3, None, True):
            obj = {"type": "ping", "id": "a", "timestamp": 1, "payload": value}
            self.assertEqual(decode(dumps(obj)), obj)

    def test_invalid_json(self) -> None:
        """A message starting with ``{`` that is not JSON, or not one object, is rejected."""
        for data in (b"{", b'{"type":"ping"', b'{"type":"ping","id":"a","timestamp":1}x', b"{}", b"{} {}"):
            self.assertRaises(wire.DecodeError, decode, data)

    def test_invalid_utf8_replaced(self) -> None:
        """Invalid UTF-8 in a JSON message is replaced with U+FFFD."""
        message = decode(b'{"type":"ping","id":"a\xff","timestamp":1}')
        self.assertEqual(message["id"], "a\ufffd")


class FrameTests(SynchronousTestCase):
    body = {"id": "s-1", "documentId": "doc", "value": None, "n": 1.5}

    def test_binary_encoding(self) -> None:
        """Binary: header code and timestamp, byte length, then the body with id but no type or timestamp."""
        data = wire.Frame("delta", -3, dict(self.body)).binary()
        code, timestamp, length = struct.unpack_from(">BqI", data)
        self.assertEqual((code, timestamp, length), (0x20, -3, len(data) - 13))
        payload = json.loads(data[13:])
        self.assertEqual(payload, self.body)
        self.assertNotIn("type", payload)
        self.assertNotIn("timestamp", payload)

    def test_text_encoding(self) -> None:
        """JSON text: the whole message, type, id and timestamp included."""
        data = wire.Frame("delta", 7, dict(self.body)).text()
        self.assertEqual(json.loads(data), {"type": "delta", "timestamp": 7, **self.body})

    def test_null_values_kept(self) -> None:
        """A member whose value is null is emitted as null in both encodings, not dropped."""
        f = wire.Frame("delta", 1, {"id": "a", "value": None})
        self.assertIn("value", json.loads(f.binary()[13:]))
        self.assertIsNone(json.loads(f.binary()[13:])["value"])
        self.assertIsNone(json.loads(f.text())["value"])

    def test_non_ascii_round_trips(self) -> None:
        """Non-ASCII text survives both encodings and binary decoding; the header counts its bytes."""
        body = {"id": "ü", "value": "héllo € 😀 日本"}
        f = wire.Frame("awareness_update", TS, body)
        self.assertEqual(wire.decode(f.binary(), IdSource()), message_of(f))
        self.assertEqual(struct.unpack_from(">I", f.binary(), 9)[0], len(f.binary()) - 13)
        self.assertEqual(json.loads(f.text().decode("utf-8")), message_of(f))
        self.assertEqual(wire.decode(f.text(), IdSource()), message_of(f))

    def test_every_type_round_trips(self) -> None:
        """Each type's binary encoding decodes back to the message, as a client would see it."""
        for name in PROTOCOL_CODES:
            f = wire.Frame(name, TS, {"id": "x", "k": [1, {"a": "b"}]})
            expected = {"type": name, "timestamp": TS, "id": "x", "k": [1, {"a": "b"}]}
            self.assertEqual(wire.decode(f.binary(), IdSource()), expected)

    def test_encodings_computed_once(self) -> None:
        """Each encoding is built once: later calls return the same bytes object, even if the body changes."""
        body: dict[str, Any] = {"id": "a"}
        f = wire.Frame("pong", 1, body)
        binary, text = f.binary(), f.text()
        body["late"] = True
        self.assertIs(f.binary(), binary)
        self.assertIs(f.text(), text)
        self.assertIs(f.encoded(True), binary)
        self.assertIs(f.encoded(False), text)
        self.assertNotIn(b"late", binary + text)

    def test_decoded_messages_can_be_encoded(self) -> None:
        """
        Anything the decoder accepts can be sent on again: a value nested as deep as the decoder
        allows encodes in both encodings (orjson cannot encode much deeper than that).
        """
        depth = wire.MAX_DEPTH - 1
        payload = b'{"id":"a","value":' + b"[" * depth + b"]" * depth + b"}"
        message = decode(frame(0x20, payload))
        body = {k: v for k, v in message.items() if k not in ("type", "timestamp")}
        f = wire.Frame("delta", TS, body)
        self.assertEqual(wire.decode(f.binary(), IdSource()), message)
        self.assertEqual(json.loads(f.text()), message)


class SizeTests(SynchronousTestCase):
    def test_json_length_counts_characters(self) -> None:
        """json_length is the compact JSON length in characters, not bytes."""
        message = {"type": "delta", "id": "a", "timestamp": 1, "v": "é€😀", "n": None}
        expected = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
        self.assertEqual(wire.json_length(message), len(expected))
        self.assertLess(wire.json_length(message), len(expected.encode("utf-8")))

    def test_json_length_of_deeply_nested_message(self) -> None:
        """json_length measures any message the decoder accepts, deep nesting included."""
        depth = wire.MAX_DEPTH - 1
        message = decode(frame(0x20, b'{"id":"a","v":' + b"[" * depth + b"]" * depth + b"}"))
        self.assertEqual(wire.json_length(message), len(json.dumps(message, separators=(",", ":"))))

    def test_too_deep_is_refused(self) -> None:
        """A value nested deeper than MAX_DEPTH is refused at decoding, in both encodings."""
        depth = wire.MAX_DEPTH + 1
        nested = b"[" * depth + b"]" * depth
        self.assertRaises(wire.DecodeError, decode, frame(0x20, b'{"id":"a","v":' + nested + b"}"))
        self.assertRaises(wire.DecodeError, decode, b'{"type":"delta","id":"a","timestamp":1,"v":' + nested + b"}")

    def test_many_brackets_but_shallow_is_fine(self) -> None:
        """Many sibling arrays are not depth: a wide, shallow message decodes."""
        message = decode(frame(0x20, b'{"id":"a","v":[' + b",".join([b"[]"] * 500) + b"]}"))
        self.assertEqual(len(message["v"]), 500)

    def test_may_exceed_boundary(self) -> None:
        """may_exceed is true exactly when five times the raw size plus 256 could pass the limit."""
        self.assertFalse(wire.may_exceed(100, 1000))
        self.assertFalse(wire.may_exceed(148, 1000))
        self.assertTrue(wire.may_exceed(149, 1000))
        self.assertTrue(wire.may_exceed(5000, 1000))

    def test_may_exceed_covers_header_members(self) -> None:
        """A frame skipped by may_exceed really is within the limit once type, id and timestamp are added."""
        ids = wire.MessageIds()
        data = frame(0x41, b'{"v":"' + b"x" * 500 + b'"}', timestamp=-(2**63))
        message = wire.decode(data, lambda: ids(2**53))
        limit = len(data) * 5 + 256
        self.assertFalse(wire.may_exceed(len(data), limit))
        self.assertLessEqual(wire.json_length(message), limit)

    def test_may_exceed_is_never_wrong(self) -> None:
        """
        A message that may_exceed lets through without measuring is never over the limit, even
        when re-serialising expands it (``1e9`` re-serialises as ten or more characters).
        """
        payload = b'{"id":"a","v":[' + b",".join([b"1e9"] * 150) + b"]}"
        data = frame(0x20, payload)
        message = decode(data)
        limit = 1000
        self.assertLess(len(data), limit)
        if not wire.may_exceed(len(data), limit):
            self.assertLessEqual(wire.json_length(message), limit)


class MessageIdsTests(SynchronousTestCase):
    def test_unique_within_one_millisecond(self) -> None:
        """Many ids made in the same millisecond are all distinct strings."""
        ids = wire.MessageIds()
        made = [ids(TS) for _ in range(10_000)]
        self.assertEqual(len(set(made)), len(made))
        for i in made:
            self.assertIsInstance(i, str)
            self.assertTrue(i.startswith(f"{TS}-"))

    def test_processes_differ(self) -> None:
        """Two generators (two server processes) do not produce the same ids."""
        a, b = wire.MessageIds(), wire.MessageIds()
        self.assertFalse({a(TS) for _ in range(100)} & {b(TS) for _ in range(100)})


# Fuzzing

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
json_keys = st.sampled_from(["id", "timestamp", "type", "payload", "documentId", "x"]) | st.text(max_size=6)
json_objects = st.dictionaries(json_keys, json_values, max_size=6)
int64 = st.integers(-(2**63), 2**63 - 1)

FUZZ = settings(max_examples=300, deadline=None)


class FuzzTests(SynchronousTestCase):
    def check(self, data: bytes) -> Optional[wire.Message]:
        """Decode, accepting only a well-formed message or a DecodeError."""
        try:
            message = wire.decode(data, lambda: "generated")
        except wire.DecodeError:
            return None
        self.assertIsInstance(message, dict)
        self.assertIn("id", message)
        self.assertIn("timestamp", message)
        if data[:1] == b"{":
            # JSON: any type JavaScript finds truthy; the session refuses unknown ones.
            self.assertTrue(wire.js_truthy(message["type"]))
        else:
            self.assertIsInstance(message["type"], str)
            self.assertIn(message["type"], PROTOCOL_CODES)
        return message

    @FUZZ
    @given(st.binary(max_size=80))
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes decode to a message or raise DecodeError, nothing else."""
        self.check(data)

    @FUZZ
    @given(st.binary(max_size=60))
    def test_random_bytes_after_brace(self, rest: bytes) -> None:
        """Random bytes starting with ``{`` (the JSON path) decode or raise DecodeError."""
        self.check(b"{" + rest)

    @FUZZ
    @given(st.sampled_from(sorted(PROTOCOL_CODES.values())), int64, json_objects, st.booleans())
    def test_valid_frames_truncated(self, code: int, timestamp: int, payload: dict, ascii_only: bool) -> None:
        """A valid frame decodes as expected; every proper prefix of it is rejected."""
        data = frame(code, json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8"), timestamp)
        for size in range(len(data)):
            self.assertRaises(wire.DecodeError, wire.decode, data[:size], lambda: "generated")
        message = self.check(data)
        assert message is not None
        self.assertEqual(message["type"], wire.CODE_TYPES[code])
        self.assertEqual(message["timestamp"], payload.get("timestamp", timestamp))
        self.assertEqual(message["id"], payload["id"] if "id" in payload else "generated")

    @FUZZ
    @given(st.integers(0, 255), int64, json_values, st.binary(max_size=8))
    def test_random_codes_and_payloads(self, code: int, timestamp: int, payload: Any, trailer: bytes) -> None:
        """Any type code with any JSON payload (and trailing junk) decodes or raises DecodeError."""
        message = self.check(frame(code, dumps(payload), timestamp) + trailer)
        if message is not None:
            self.assertIn(code, wire.CODE_TYPES)
            self.assertIsInstance(payload, (dict, type(None)))

    @FUZZ
    @given(st.integers(0, 255), st.binary(max_size=40), st.integers(0, 60))
    def test_random_codes_and_payload_bytes(self, code: int, payload: bytes, length: int) -> None:
        """Any code, arbitrary payload bytes and an arbitrary declared length: a message or DecodeError."""
        self.check(frame(code, payload, length=length))

    @FUZZ
    @given(json_objects)
    def test_random_json_objects(self, obj: dict) -> None:
        """Random JSON objects decode or raise DecodeError; accepted ones keep the top-level type."""
        message = self.check(dumps(obj))
        if message is not None:
            self.assertEqual(message["type"], obj["type"])


class DecodeCostTests(SynchronousTestCase):
    """What a client's message may cost to parse is bounded before orjson sees it (issue 11, item 1)."""

    def refuse_parsing(self) -> None:
        def parse(data: Any) -> Any:
            raise AssertionError("orjson parsed a message that should have been refused first")

        self.patch(wire.orjson, "loads", parse)

    def test_bomb_refused_before_parsing(self) -> None:
        """
        The issue's 15 MB message of empty arrays, and a 15 MB one of commas, are refused
        without being parsed, in both encodings.
        """
        self.refuse_parsing()
        arrays = b'{"type":"ping","id":"x","timestamp":1,"a":[' + b",".join([b"[]"] * 5_000_000) + b"]}"
        items = b'{"type":"ping","id":"x","timestamp":1,"a":[' + b",".join([b"1"] * 7_000_000) + b"]}"
        for data in (arrays, items, frame(0x30, arrays), frame(0x30, items)):
            with self.assertRaises(wire.DecodeError):
                wire.decode(data, IdSource(), max_size=2_000_000)

    def test_bounds_follow_the_size_limit(self) -> None:
        """
        A message may hold one array or object per 16 characters of the size limit and one
        separator (``,`` or ``:``) per 4: exactly that many decode, one more is refused.
        """
        limit = 16_000
        head = b'{"type":"ping","id":"x","timestamp":1,"a":['  # 2 containers, 7 separators

        def arrays(n: int) -> bytes:
            return head + b",".join([b"[]"] * n) + b"]}"

        def numbers(n: int) -> bytes:
            return head + b",".join([b"1"] * n) + b"]}"

        most = limit // wire.CHARS_PER_CONTAINER - 2
        self.assertEqual(len(wire.decode(arrays(most), IdSource(), limit)["a"]), most)
        self.assertRaises(wire.DecodeError, wire.decode, arrays(most + 1), IdSource(), limit)
        most = limit // wire.CHARS_PER_ITEM - 7 + 1
        self.assertEqual(len(wire.decode(numbers(most), IdSource(), limit)["a"]), most)
        self.assertRaises(wire.DecodeError, wire.decode, numbers(most + 1), IdSource(), limit)

    def test_trusted_input_unbounded(self) -> None:
        """Without a size limit (what the server itself sent), any number of values decodes."""
        data = frame(0x13, b'{"id":"s","state":{"a":[' + b",".join([b"[]"] * 200_000) + b"]}}")
        self.assertEqual(len(decode(data)["state"]["a"]), 200_000)

    def test_deep_and_wide_refused_at_c_speed(self) -> None:
        """
        A message both very wide and too deep is refused; one as wide and exactly MAX_DEPTH
        deep decodes (the depth check encodes the value rather than walking it in Python).
        """
        wide = b",".join([b"[]"] * 100_000)
        for depth, refused in ((wire.MAX_DEPTH - 1, False), (wire.MAX_DEPTH, True)):
            data = b'{"type":"ping","id":"x","timestamp":1,"w":[' + wide + b'],"d":' + b"[" * depth + b"]" * depth + b"}"
            if refused:
                self.assertRaises(wire.DecodeError, wire.decode, data, IdSource(), 4_000_000)
            else:
                self.assertEqual(len(wire.decode(data, IdSource(), 4_000_000)["w"]), 100_000)

    def test_orjson_encoding_depth(self) -> None:
        """
        orjson encodes 254 levels of nesting and refuses 255: the depth check relies on it,
        so this fails on an orjson that changes it.
        """
        value: Any = []
        for _ in range(wire.ORJSON_MAX_DEPTH - 1):
            value = [value]
        wire.orjson.dumps(value)
        self.assertRaises(wire.orjson.JSONEncodeError, wire.orjson.dumps, [value])
