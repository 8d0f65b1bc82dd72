"""
Every shape of JSON value a client can write reads back as it was served, after the server and
PostgreSQL itself restart (item 10 of issue 11): PostgreSQL keeps numbers as decimals, and
``1e20`` used to come back as an integer no encoder of ours could send, which made the whole
document answer ``Subscribe failed``.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from synckit.storage.postgres import PostgresStorage
from synckit.wire import Frame
from tests.services import PostgresServer
from tests.wsclient import RecordingClient, ServiceCase

#: field -> the JSON text a client sends for it, exactly (numbers as clients write them)
VALUES: dict[str, str] = {
    "e20": "1e20",
    "minus_9_3e18": "-9.3e18",
    "two_64": "18446744073709551616",
    "e300": "1e300",
    "minus_e300": "-1E300",
    "max_double": "1.7976931348623157e308",
    "min_subnormal": "5e-324",
    "tiny": "1e-300",
    "int64_max": "9223372036854775807",
    "int64_min": "-9223372036854775808",
    "uint64_max": "18446744073709551615",
    "beyond_2_53": "9007199254740993",
    "tenth": "0.1",
    "one_point_zero": "1.0",
    "negative_zero": "-0.0",
    "zero": "0",
    "minus_one": "-1",
    "exponent": "123.456e5",
    "integral_float": "1e15",
    "true": "true",
    "false": "false",
    "null": "null",
    "empty_string": '""',
    "unicode": '"héllo ✓ 😀 \\ud83d\\ude00"',
    "controls": '"\\u0001\\n\\t\\"\\\\ </script>"',
    "long_string": '"' + "x" * 100_000 + '"',
    "empty_array": "[]",
    "empty_object": "{}",
    "nested_empty": "[[[]],{}]",
    "mixed": '{"a": {"b": [1, 2.5, {"c": null}]}, "": "empty key", "ключ": [true, false]}',
    "deep": "[" * 150 + "1e20" + "]" * 150,
    "not_a_tombstone": '{"__deleted": false, "__also": "true"}',
    "big_in_array": "[1e20, -9.3e18, 18446744073709551616, 1e300]",
}


def delta_frame(message_id: str, fields: dict[str, str]) -> bytes:
    """A JSON text delta whose values are the given JSON texts, verbatim."""
    delta = ", ".join(f"{orjson.dumps(name).decode()}: {text}" for name, text in fields.items())
    return (
        f'{{"type": "delta", "id": "{message_id}", "timestamp": 1, "documentId": "values", "delta": {{{delta}}}}}'
    ).encode("utf-8")


async def served(client: RecordingClient, request: str) -> dict[str, Any]:
    client.sendMessage(
        orjson.dumps({"type": "sync_request", "id": request, "timestamp": 1, "documentId": "values"}), isBinary=False
    )
    reply = await client.wait_for(lambda m: m["type"] == "sync_response" and m["requestId"] == request, timeout=30)
    return reply["state"]


class RestartTests(ServiceCase):
    async def test_every_value_survives_a_restart(self) -> None:
        """
        Each value, written as a client writes it, is served the same before and after both the
        server and PostgreSQL restart: equal as JSON, and the numbers of issue 11 byte for byte.
        A number no client could send (1e400, written into the row by hand) reads as null
        instead of making the document unreadable.
        """
        server = PostgresServer()
        self.addCleanup(server.destroy)
        server.start()
        service, port = await self.started(storage=PostgresStorage(reactor, server.url, pool_size=1, auto_migrate=True))
        client = await self.client(port)
        client.sendMessage(delta_frame("w", VALUES), isBinary=False)
        ack = await client.wait_for(lambda m: m["type"] in ("ack", "error"), timeout=30)
        self.assertEqual(ack["type"], "ack", ack)
        before = await served(client, "before")
        self.assertEqual(set(before), set(VALUES))
        await service.stopService()

        server.kill()
        server.start()
        server.execute("UPDATE documents SET state = jsonb_set(state, '{fields,huge}', '1e400')")
        _, port = await self.started(storage=PostgresStorage(reactor, server.url, pool_size=1))
        after = await served(await self.client(port), "after")

        self.assertEqual(after, {**before, "huge": None})
        for name in ("e20", "minus_9_3e18", "two_64", "e300", "big_in_array", "deep", "unicode", "one_point_zero"):
            self.assertEqual(orjson.dumps(after[name]), orjson.dumps(before[name]), name)


class EncoderTests(SynchronousTestCase):
    def test_integers_beyond_64_bits_are_sent(self) -> None:
        """
        An integer orjson cannot encode, which only a row written by another program could hold,
        goes out as the float JavaScript would read (null past a double's range), not as an error.
        """
        frame = Frame("sync_response", 1, {"state": {"a": [2**64, -(2**70), 10**400, {"b": 3}]}})
        self.assertEqual(orjson.loads(frame.text())["state"], {"a": [2.0**64, -(2.0**70), None, {"b": 3}]})
        self.assertIn(b'"b":3', frame.binary())
