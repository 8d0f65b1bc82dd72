"""
JSON-lines logging for journald and log shippers: ``twistd --logger=synckit.logs.json ...``.

One JSON object per line on standard output: ``time`` (ISO 8601, UTC), ``level``,
``namespace``, ``message`` (the event's text), the event's own structured fields (those JSON can
carry; others as their ``repr``), and ``traceback`` when the event has a failure.  The default,
without ``--logger``, stays twistd's human-readable text.
"""

from __future__ import annotations

import datetime
import sys
from typing import IO, Any, Optional

import orjson
from twisted.logger import FileLogObserver, ILogObserver, formatEvent

#: Twisted's own bookkeeping keys in an event, not worth a field of their own.
_INTERNAL = frozenset(
    ("log_format", "log_level", "log_namespace", "log_time", "log_source", "log_logger", "log_failure",
     "log_io", "log_legacy", "log_system", "log_flattened", "log_trace", "log_text", "format", "message",
     "isError", "system", "time", "failure", "why")
)  # fmt: skip


def event_as_json(event: dict[str, Any]) -> str:
    """One log event as a JSON line."""
    record: dict[str, Any] = {
        "time": datetime.datetime.fromtimestamp(event.get("log_time", 0), datetime.timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        "level": event["log_level"].name if "log_level" in event else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key not in _INTERNAL and key not in record and not key.startswith("_"):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    try:
        line = orjson.dumps(record, default=repr, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # what even default= cannot help with, such as integers beyond 64 bits
        line = orjson.dumps({key: value if isinstance(value, str) else repr(value) for key, value in record.items()})
    return line.decode("utf-8") + "\n"


def json(out: Optional[IO[str]] = None) -> ILogObserver:
    """The observer twistd's ``--logger`` asks for: JSON lines on C{out} (standard output)."""
    return FileLogObserver(out or sys.stdout, event_as_json)
