"""
The SyncKit wire codec: WebSocket message bytes <-> message dicts.

Two encodings share one connection (docs/protocol.md section 2):

- binary frames, ``[u8 type code][i64 BE timestamp ms][u32 BE payload length][JSON payload]``,
  used by the SDK and the test client;
- JSON text, one object with ``type``, ``id`` and ``timestamp`` beside the other members.

A message that starts with ``{`` is JSON, anything else is binary, whatever WebSocket opcode it
came in.  Messages are plain dicts, as the protocol is JSON: decoding yields a dict that always has
``type``, ``id`` and ``timestamp``; encoding takes an L{Frame}, which serialises each encoding at
most once however many connections it is sent to.

This module does no I/O and imports nothing from Twisted or Autobahn, so the codec can be tested
and fuzzed on its own.
"""

from __future__ import annotations

import itertools
import secrets
import struct
from typing import Any, Callable, Optional

import orjson

Message = dict[str, Any]

#: Type codes of the binary encoding, as in the SDK's ``client.ts`` (docs/protocol.md section 2).
TYPE_CODES: dict[str, int] = {
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
CODE_TYPES: dict[int, str] = {code: name for name, code in TYPE_CODES.items()}

HEADER = struct.Struct(">BqI")
HEADER_SIZE = HEADER.size  # 13

_JSON_START = 0x7B  # "{"


class DecodeError(ValueError):
    """
    The bytes are not a SyncKit message.  The connection survives it: the session answers with
    an ``Invalid message format`` error.
    """


#: Deepest nesting a message may have.  orjson cannot encode values nested much deeper (about
#: 254 levels), and a value that was accepted must be broadcast and served back later.
MAX_DEPTH = 200

#: How deep orjson encodes: one level more and it refuses.  L{_too_deep} relies on it, and a test
#: fails on an orjson that changes it.
ORJSON_MAX_DEPTH = 254

#: Characters of the message size limit per array or object, and per ``,`` or ``:``, that a
#: message may have before it is parsed (L{check_cost}).
CHARS_PER_CONTAINER = 16
CHARS_PER_ITEM = 4


def js_truthy(value: Any) -> bool:
    """Truthiness as JavaScript has it: empty arrays and objects are true, NaN is false."""
    if isinstance(value, (dict, list)):
        return True
    if isinstance(value, float) and value != value:
        return False
    return bool(value)


def check_cost(raw: bytes, max_size: int) -> int:
    """
    Refuse JSON whose parsing would cost too much, before it is parsed; returns how many C{[}
    and C{{} bytes it has.

    Parsing time goes with the number of values, above all arrays and objects (each a Python
    object the garbage collector tracks), not with bytes: a 15 MB message of empty arrays took
    orjson 1.2 s, in which no other client was served.  A message may have one array or object
    per L{CHARS_PER_CONTAINER} characters of C{max_size} (the message size limit) and one
    separator (C{,} or C{:}) per L{CHARS_PER_ITEM}: at the default limit, 125,000 and 500,000,
    which parse in tens of milliseconds.  The bytes are counted at C speed, strings included: text
    full of brackets or commas counts as much as structure, so the bounds leave room for that.

    @raise DecodeError: when it has more than that.
    """
    containers = raw.count(b"[") + raw.count(b"{")
    if containers > max_size // CHARS_PER_CONTAINER:
        raise DecodeError(f"more than {max_size // CHARS_PER_CONTAINER} arrays and objects")
    if raw.count(b",") + raw.count(b":") > max_size // CHARS_PER_ITEM:
        raise DecodeError(f"more than {max_size // CHARS_PER_ITEM} members and elements")
    return containers


def _too_deep(value: Any) -> bool:
    """
    Whether a parsed value is nested more than L{MAX_DEPTH} levels deep, at C speed: wrapped in
    C{ORJSON_MAX_DEPTH - MAX_DEPTH} more lists, it encodes exactly when it is shallow enough
    (values orjson parsed have nothing else it could refuse to encode).  A walk in Python took
    seconds on a message of millions of empty arrays.
    """
    for _ in range(ORJSON_MAX_DEPTH - MAX_DEPTH):
        value = [value]
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return True
    return False


def _loads(raw: bytes, max_size: Optional[int]) -> Any:
    """
    Parse JSON from UTF-8 bytes, after L{check_cost} when C{max_size} is given.  Invalid UTF-8
    is replaced with U+FFFD first, as the reference's ``Buffer.toString('utf8')`` does; the fast
    path is one orjson call.
    """
    containers = check_cost(raw, max_size) if max_size is not None else None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            value = orjson.loads(raw.decode("utf-8", "replace"))
        except orjson.JSONDecodeError as e:
            raise DecodeError(f"invalid JSON: {e}") from None
    # Only a message with that many brackets can be that deep: the check is rarely needed.
    if containers is None:
        containers = raw.count(b"[") + raw.count(b"{")
    if containers > MAX_DEPTH and _too_deep(value):
        raise DecodeError(f"nested more than {MAX_DEPTH} levels deep")
    return value


def decode(data: bytes, new_id: Callable[[], str], max_size: Optional[int] = None) -> Message:
    """
    Decode one WebSocket message.

    @param data: the message bytes (text frames as their UTF-8 bytes).
    @param new_id: makes an id for a binary message whose payload has none; the reference does
        the same, and correlation fields (``requestId``, ``messageId``) then carry that id.
    @param max_size: the message size limit, in characters, when C{data} comes from a client:
        it bounds what the JSON may cost to parse (L{check_cost}).  C{None} for trusted input.
    @raise DecodeError: for anything that is not a valid message.
    """
    if data[:1] == b"{":
        return _decode_json(data, max_size)
    return _decode_binary(data, new_id, max_size)


def _decode_json(data: bytes, max_size: Optional[int]) -> Message:
    obj = _loads(data, max_size)
    if not isinstance(obj, dict):
        raise DecodeError("JSON message is not an object")
    # The reference checks truthiness before flattening, so these must be at the top level.
    if not (js_truthy(obj.get("type")) and js_truthy(obj.get("id")) and js_truthy(obj.get("timestamp"))):
        raise DecodeError("JSON message lacks type, id or timestamp")
    nested = obj.get("payload")
    if isinstance(nested, dict):
        members = nested.items()
    elif isinstance(nested, list):
        members = ((str(i), v) for i, v in enumerate(nested))
    else:
        return obj
    flat = {k: v for k, v in obj.items() if k != "payload"}
    for k, v in members:
        if k != "type":
            flat[k] = v
    return flat


def _decode_binary(data: bytes, new_id: Callable[[], str], max_size: Optional[int]) -> Message:
    if len(data) < HEADER_SIZE:
        raise DecodeError(f"binary frame of {len(data)} bytes is shorter than its header")
    code, timestamp, length = HEADER.unpack_from(data)
    end = HEADER_SIZE + length
    if len(data) < end:
        raise DecodeError(f"binary frame declares {length} payload bytes, has {len(data) - HEADER_SIZE}")
    name = CODE_TYPES.get(code)
    if name is None:
        raise DecodeError(f"unknown type code 0x{code:02x}")
    payload = _loads(data[HEADER_SIZE:end], max_size)
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        raise DecodeError("binary payload is not a JSON object")
    # Reference order: generated id, header timestamp, then every payload member (so a payload
    # id or timestamp overrides), and the header's type last (a payload type is ignored).
    message: Message = {"id": payload["id"] if js_truthy(payload.get("id")) else new_id(), "timestamp": timestamp}
    message.update(payload)
    message["type"] = name
    return message


def json_length(message: Message) -> int:
    """
    Length of C{message} re-serialised as compact JSON, in characters: what the reference's size
    limit measures (it counts UTF-16 code units; code points are close enough).
    """
    return len(orjson.dumps(message).decode("utf-8"))


def may_exceed(raw_size: int, limit: int) -> bool:
    """
    Whether a message that arrived as C{raw_size} bytes could re-serialise to more than C{limit}
    characters, so that smaller messages skip the exact (costly) measurement.  UTF-8 never has
    fewer bytes than characters; what can grow is numbers (``1e15`` comes back as
    ``1000000000000000.0``, 4.5 times longer) and the header's type, id and timestamp.
    """
    return raw_size * 5 + 256 > limit


def _dumps(value: Any) -> bytes:
    """
    C{value} as JSON.  orjson refuses integers beyond 64 bits, which no client's JSON gives us
    (orjson reads them as floats) but a stored row written by another program could: those are
    sent as the floats JavaScript would read them as (C{null} past a double's range), so that
    one such value never makes a document impossible to send.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return orjson.dumps(_portable(value))


def _portable(value: Any) -> Any:
    """C{value} with every integer orjson cannot encode replaced by a float (or C{None})."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if type(value) is int and not -(2**63) <= value < 2**64:
        try:
            return float(value)
        except OverflowError:
            return None
    return value


class Frame:
    """
    One outgoing message.  Its binary and JSON encodings are each made once, on first use, and
    then shared by every connection it is sent to: a broadcast is serialised once, not once per
    subscriber.

    @ivar cache: free for the transport adapter to keep its framed form of each encoding in.
    """

    __slots__ = ("type", "timestamp", "body", "_binary", "_text", "cache")

    def __init__(self, type: str, timestamp: int, body: Message) -> None:
        self.type = type
        self.timestamp = timestamp
        self.body = body
        self._binary: Optional[bytes] = None
        self._text: Optional[bytes] = None
        self.cache: dict[bool, Any] = {}

    def binary(self) -> bytes:
        """The binary frame: header, then the body (which carries ``id`` but not type/timestamp)."""
        if self._binary is None:
            payload = _dumps(self.body)
            self._binary = HEADER.pack(TYPE_CODES[self.type], self.timestamp, len(payload)) + payload
        return self._binary

    def text(self) -> bytes:
        """The JSON encoding: the whole message, type and timestamp included, as UTF-8."""
        if self._text is None:
            self._text = _dumps({"type": self.type, "timestamp": self.timestamp, **self.body})
        return self._text

    def encoded(self, binary: bool) -> bytes:
        return self.binary() if binary else self.text()



class MessageIds:
    """
    Fresh ids for server-originated messages, ``<ms>-<process tag><counter>``.  Clients treat
    ids as opaque strings; the random tag keeps two server processes from repeating each other.
    """

    def __init__(self) -> None:
        self._tag = secrets.token_hex(3)
        self._counter = itertools.count(1)

    def __call__(self, now_ms: int) -> str:
        return f"{now_ms}-{self._tag}{next(self._counter):x}"
