"""
The JSON report of one run, its file name, and the side-by-side comparison of two reports.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any, Optional

from synckit.bench.scenarios import CANARY_INTERVAL, Options, Result
from synckit.bench.stats import summary


def iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds")


def build(
    options: Options,
    result: Result,
    server: dict[str, Any],
    started: datetime.datetime,
    finished: datetime.datetime,
    resources: list[dict[str, float]],
    processes: int,
) -> dict[str, Any]:
    elapsed = result.elapsed or 1e-9
    missing = max(0, result.sent - result.received) if options.scenario == "fanout" else result.missing
    config = {k: v for k, v in vars(options).items() if k not in ("worker", "workers", "token")}
    built = {
        "metadata": {
            "tool": "synckit-bench",
            "server": server,
            "scenario": options.scenario,
            "started_at": iso(started),
            "finished_at": iso(finished),
        },
        "client": {"processes": processes, "encoding": "json-text" if options.text else "binary"},
        "config": config,
        "throughput": {
            "messages_per_s": round(result.received / elapsed, 1),
            "sent": result.sent,
            "received": result.received,
            "connections": result.connections,
            "elapsed_s": round(elapsed, 3),
        },
        "latency_ms": summary(result.latencies_ms),
        "errors": {
            "missing": missing,
            "out_of_order": result.out_of_order,
            "refused": result.refused,
            "connection_errors": len(result.errors),
            "samples": result.errors[:10],
        },
        "resources": resources,
    }
    if options.peer_url:
        built["latency_peer_ms"] = summary(result.peer_latencies_ms)
    if options.scenario == "text":
        built["canary"] = canary(result)
    return built


def canary(result: Result) -> dict[str, Any]:
    """
    The canary's ping -> pong round trips: a pong waits for whatever the server's reactor is
    doing when the ping arrives, so the slowest ones are its longest stalls.
    """
    stalls = summary(result.stall_latencies_ms)
    return {
        "interval_ms": CANARY_INTERVAL * 1000,
        "pings": stalls["count"] + result.stall_missing,
        "unanswered": result.stall_missing,
        "p50_ms": stalls["p50"],
        "stall_p99_ms": stalls["p99"],
        "stall_max_ms": stalls["max"],
    }


def file_name(report: dict[str, Any]) -> str:
    """``<scenario>-<server>-<UTC time>.json``, e.g. ``fanout-synckit-20261123T041500Z.json``."""
    meta = report["metadata"]
    server = re.sub(r"[^a-z0-9]+", "-", str(meta["server"].get("name", "unknown")).lower()).strip("-") or "unknown"
    stamp = datetime.datetime.fromisoformat(meta["started_at"]).strftime("%Y%m%dT%H%M%SZ")
    return f"{meta['scenario']}-{server}-{stamp}.json"


def write(report: dict[str, Any], folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, file_name(report))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    return path


#: (label, path into the report, whether higher is better)
ROWS = (
    ("throughput msgs/s", ("throughput", "messages_per_s"), True),
    ("latency p50 ms", ("latency_ms", "p50"), False),
    ("latency p90 ms", ("latency_ms", "p90"), False),
    ("latency p99 ms", ("latency_ms", "p99"), False),
    ("latency max ms", ("latency_ms", "max"), False),
    ("latency mean ms", ("latency_ms", "mean"), False),
    ("missing", ("errors", "missing"), False),
    ("out of order", ("errors", "out_of_order"), False),
    ("refused", ("errors", "refused"), False),
    ("connection errors", ("errors", "connection_errors"), False),
    ("stall p99 ms (canary)", ("canary", "stall_p99_ms"), False),
    ("stall max ms (canary)", ("canary", "stall_max_ms"), False),
    ("server CPU % (mean)", ("resources", "cpu_pct"), False),
    ("server RSS MiB (peak)", ("resources", "rss_kb"), False),
)


def _get(report: dict[str, Any], path: tuple[str, str]) -> Optional[float]:
    section, key = path
    if section == "resources":
        values = [sample[key] for sample in report.get("resources", [])]
        if not values:
            return None
        return round(max(values) / 1024, 1) if key == "rss_kb" else round(sum(values) / len(values), 1)
    return report.get(section, {}).get(key)


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """A Markdown table of two reports side by side, with the ratio a/b of each row."""
    name = lambda r: f"{r['metadata']['server'].get('name', '?')} {r['metadata']['server'].get('version', '')}".strip()  # noqa: E731
    lines = [
        f"scenario: {a['metadata']['scenario']} / {b['metadata']['scenario']}",
        "",
        f"| | {name(a)} | {name(b)} | ratio |",
        "|---|---|---|---|",
    ]
    for label, path, _ in ROWS:
        x, y = _get(a, path), _get(b, path)
        if x is None and y is None:
            continue
        ratio = f"{x / y:.2f}x" if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y else "-"
        lines.append(f"| {label} | {'-' if x is None else x} | {'-' if y is None else y} | {ratio} |")
    return "\n".join(lines) + "\n"
