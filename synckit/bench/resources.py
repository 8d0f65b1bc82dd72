"""The measured server's CPU and memory, sampled from /proc once a second while a scenario runs."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from twisted.internet.task import LoopingCall

_TICKS = os.sysconf("SC_CLK_TCK")


def read_process(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, resident set in KiB) of process C{pid}."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return cpu, rss


class Sampler:
    """Samples C{pid} every second: elapsed seconds, CPU % of one core over the last second, RSS."""

    def __init__(self, pid: int, clock: Any) -> None:
        read_process(pid)  # fail now, with a clear error, if there is no such process
        self.pid = pid
        self.series: list[dict[str, float]] = []
        self._loop = LoopingCall(self._sample)
        self._loop.clock = clock
        self._start = time.monotonic()
        self._last: Optional[tuple[float, float]] = None

    def start(self) -> None:
        self._loop.start(1.0, now=True)

    def stop(self) -> None:
        """Stop, with one last sample, so that even a run shorter than a second has one."""
        if self._loop.running:
            self._loop.stop()
            self._sample()

    def _sample(self) -> None:
        try:
            cpu, rss = read_process(self.pid)
        except OSError:
            self.stop()  # the server is gone; the scenario will say so
            return
        now = time.monotonic()
        if self._last is not None:
            then, cpu_then = self._last
            self.series.append(
                {"t": round(now - self._start, 3), "cpu_pct": round(100 * (cpu - cpu_then) / (now - then), 1), "rss_kb": rss}
            )
        self._last = (now, cpu)
