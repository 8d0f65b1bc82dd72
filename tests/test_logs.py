"""The JSON-lines log observer for ``twistd --logger=synckit.logs.json``."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from synckit import logs


class JsonLogTests(SynchronousTestCase):
    def lines(self, emit) -> list[dict]:
        out = io.StringIO()
        emit(Logger(namespace="synckit.test", observer=logs.json(out)))
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_fields(self) -> None:
        """Time, level, namespace, the formatted message and the structured fields, one object a line."""
        [line] = self.lines(lambda log: log.info("listening on {port}", port=8080))
        self.assertEqual(
            {k: line[k] for k in ("level", "namespace", "message", "port")},
            {"level": "info", "namespace": "synckit.test", "message": "listening on 8080", "port": 8080},
        )
        self.assertRegex(line["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertNotIn("log_format", line)

    def test_failure_has_traceback(self) -> None:
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        [line] = self.lines(lambda log: log.failure("it broke", failure))
        self.assertEqual((line["level"], line["message"]), ("critical", "it broke"))
        self.assertIn("ZeroDivisionError", line["traceback"])

    def test_values_json_cannot_carry(self) -> None:
        """Objects, bytes and huge integers become text instead of breaking the line."""
        [a, b] = self.lines(
            lambda log: (
                log.warn("odd {thing}", thing=object(), raw=b"\xff"),
                log.emit(LogLevel.error, "big {n}", n=2**70),
            )
        )
        self.assertIn("object object", a["thing"])
        self.assertEqual((b["message"], b["n"]), (f"big {2**70}", str(2**70)))
