"""
The ``synckit-bench`` command.

    synckit-bench SCENARIO --url ws://HOST:PORT/ws [options]    run, write a JSON report
    synckit-bench compare A.json B.json                         the two side by side

With ``--processes N`` the clients are split over N worker processes (this command again, with
``--worker I/N``), whose results are merged: one Python process saturates near one core.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import uuid
from typing import Any, Optional
from urllib.parse import urlsplit

from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.client import Agent, readBody

from synckit.bench import report
from synckit.bench.client import BenchError
from synckit.bench.resources import Sampler
from synckit.bench.scenarios import PATTERNS, SCENARIOS, Options, Result, run

DEFAULTS = {
    # scenario: overrides of the Options defaults
    "roundtrip": {"messages": 2000, "duration": 30.0},
    "burst": {"clients": 100},
    "steady": {"clients": 1000, "ramp": 10.0, "duration": 20.0},
    "fanout": {"subscribers": 10, "rate": 100.0},
    "throughput": {"clients": 50, "window": 10},
    "echo": {"clients": 50, "window": 10},
    "text": {"clients": 10, "window": 1},
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synckit-bench", description="Measure a SyncKit server (or a WebSocket echo).")
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--url", required=True, help="WebSocket URL: ws://HOST:PORT/ws (or .../echo for echo)")
    p.add_argument("--clients", type=int, help="connections (burst 100, steady 1000, throughput and echo 50, text 10)")
    p.add_argument("--subscribers", type=int, help="fanout: subscribers of the written document (10)")
    p.add_argument("--window", type=int, help="messages in flight per connection when not paced (10; text 1)")
    p.add_argument("--messages", type=int, help="roundtrip: how many (2000)")
    p.add_argument("--rate", type=float, help="messages/s per writer; 0 = as fast as the window allows")
    p.add_argument("--pattern", choices=PATTERNS, default="fixed", help="how a rate is paced (fixed)")
    p.add_argument("--burst-size", type=int, default=50, help="pattern burst: messages per burst (50)")
    p.add_argument("--ramp", type=float, help="seconds of ramp-up: rate (pattern ramp) or connections (steady)")
    p.add_argument("--duration", type=float, help="seconds of sending (10)")
    p.add_argument("--drain", type=float, default=5.0, help="seconds to wait for late replies (5)")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for each reply while connecting (15)")
    p.add_argument("--value-bytes", type=int, default=32, help="size of each delta's value (32)")
    p.add_argument("--fields", type=int, help="roundtrip: fields written to the document before measuring (0)")
    p.add_argument("--chars", type=int, help="text: characters of the pre-filled document (10000)")
    p.add_argument("--peer-url", help="fanout: a second instance's URL; subscribers alternate between the two")
    p.add_argument("--text", action="store_true", help="JSON text frames instead of binary")
    p.add_argument("--ping", action="store_true", help="roundtrip: ping -> pong instead of delta -> ack")
    p.add_argument("--doc-prefix", default="room:bench", help="document ids start with this (room:bench)")
    p.add_argument("--token", help="JWT sent with auth, for servers that require it")
    p.add_argument("--server-pid", type=int, help="sample this process's CPU and RSS every second")
    p.add_argument("--processes", type=int, default=1, help="worker processes to spread the clients over (1)")
    p.add_argument("--output-dir", default=".", help="where the JSON report goes (.)")
    p.add_argument("--plot", action="store_true", help="also write latency and resource PNGs (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    return p


def options_from(args: argparse.Namespace) -> Options:
    values: dict[str, Any] = dict(DEFAULTS[args.scenario])
    for f in dataclasses.fields(Options):
        given = getattr(args, f.name, None)
        if given is not None and f.name not in ("worker", "workers"):
            values[f.name] = given
    values["run"] = args.run or uuid.uuid4().hex[:8]
    if args.worker:
        index, _, total = args.worker.partition("/")
        values["worker"], values["workers"] = int(index), int(total)
    options = Options(scenario=args.scenario, **{k: v for k, v in values.items() if k != "scenario"})
    if options.pattern == "burst" and options.rate <= 0:
        raise BenchError("--pattern burst needs a --rate")
    return options


async def server_info(reactor: Any, url: str) -> dict[str, Any]:
    """Name and version from the server's GET / and GET /health, where it has them."""
    parts = urlsplit(url)
    base = f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"
    info: dict[str, Any] = {"url": url, "name": "unknown", "version": "unknown"}
    for path, keys in (("/", ("name", "version")), ("/health", ("version",))):
        try:
            response = await Agent(reactor, connectTimeout=5).request(b"GET", (base + path).encode())
            body = json.loads(await readBody(response))
        except Exception:
            continue
        if isinstance(body, dict):
            info.update({k: body[k] for k in keys if isinstance(body.get(k), str)})
    return info


async def run_workers(reactor: Any, argv: list[str], processes: int) -> Result:
    """Run the scenario in C{processes} copies of this command and merge their results."""
    runs = [
        Deferred.fromCoroutine(_worker(reactor, argv + ["--worker", f"{i}/{processes}", "--quiet"])) for i in range(processes)
    ]
    merged = Result()
    for part in await gatherResults(runs, consumeErrors=True):
        merged.latencies_ms += part["latencies_ms"]
        merged.peer_latencies_ms += part["peer_latencies_ms"]
        merged.stall_latencies_ms += part["stall_latencies_ms"]
        for key in ("sent", "received", "missing", "out_of_order", "refused", "connections", "stall_missing"):
            setattr(merged, key, getattr(merged, key) + part[key])
        merged.errors += part["errors"]
        merged.elapsed = max(merged.elapsed, part["elapsed"])
    return merged


async def _worker(reactor: Any, argv: list[str]) -> dict[str, Any]:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "synckit.bench.cli", *argv], env=os.environ, reactor=reactor
    )
    if code != 0:
        raise BenchError(f"a worker process failed: {err.decode(errors='replace').strip()}")
    return json.loads(out)


async def main_async(reactor: Any, argv: list[str]) -> None:
    args = parser().parse_args(argv)
    options = options_from(args)
    if args.worker:  # a worker: the raw result on stdout, for the parent to merge
        result = await run(reactor, options)
        sys.stdout.write(json.dumps(dataclasses.asdict(result)))
        return
    server = await server_info(reactor, options.url)
    sampler = Sampler(args.server_pid, reactor) if args.server_pid else None
    progress = task.LoopingCall(_progress, time.monotonic(), sampler)
    progress.clock = reactor
    if not args.quiet:
        progress.start(1.0, now=False)
    if sampler:
        sampler.start()
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        if args.processes > 1:
            argv = [a for a in argv if a != "--plot"] + ["--run", options.run]
            result = await run_workers(reactor, argv, args.processes)
        else:
            result = await run(reactor, options)
    finally:
        if progress.running:
            progress.stop()
        if sampler:
            sampler.stop()
    finished = datetime.datetime.now(datetime.timezone.utc)
    built = report.build(options, result, server, started, finished, sampler.series if sampler else [], args.processes)
    path = report.write(built, args.output_dir)
    if args.plot:
        from synckit.bench.plot import plot

        for png in plot(built, path, result.latencies_ms):
            print(png)
    print(path)
    print(json.dumps({k: built[k] for k in ("throughput", "latency_ms", "errors", "canary") if k in built}, indent=1))


def _progress(started: float, sampler: Optional[Sampler]) -> None:
    line = f"synckit-bench: {time.monotonic() - started:5.1f} s"
    if sampler is not None and sampler.series:
        last = sampler.series[-1]
        line += f"  server CPU {last['cpu_pct']:5.1f}%  RSS {last['rss_kb'] / 1024:6.1f} MiB"
    print(line, file=sys.stderr, flush=True)


def compare_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="synckit-bench compare", description="Two reports side by side.")
    p.add_argument("first")
    p.add_argument("second")
    args = p.parse_args(argv)
    reports = []
    for path in (args.first, args.second):
        try:
            with open(path, encoding="utf-8") as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as e:
            sys.exit(f"synckit-bench: cannot read {path}: {e}")
    sys.stdout.write(report.compare(*reports))


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        compare_main(argv[1:])
        return

    async def react_main(reactor: Any) -> None:
        try:
            await main_async(reactor, argv)
        except BenchError as e:
            print(f"synckit-bench: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    task.react(lambda reactor: Deferred.fromCoroutine(react_main(reactor)))


if __name__ == "__main__":
    main()
