"""PNG plots of a report (the optional ``plot`` extra: ``pip install 'synckit[plot]'``)."""

from __future__ import annotations

from typing import Any

from synckit.bench.client import BenchError


def plot(report: dict[str, Any], report_path: str, samples: list[float]) -> list[str]:
    """Latency histogram (of C{samples}, ms) and server resources over time, next to the report; their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install 'synckit[plot]'") from None
    base = report_path.removesuffix(".json")
    title = f"{report['metadata']['scenario']} - {report['metadata']['server'].get('name', '?')}"
    written = []
    latency = report["latency_ms"]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.hist(samples, bins=60)
    axes.set(title=f"{title}: latency (p50 {latency['p50']} ms, p99 {latency['p99']} ms)", xlabel="ms", ylabel="messages")
    figure.savefig(f"{base}-latency.png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    written.append(f"{base}-latency.png")
    series = report.get("resources") or []
    if series:
        figure, cpu = plt.subplots(figsize=(7, 4))
        t = [s["t"] for s in series]
        cpu.plot(t, [s["cpu_pct"] for s in series], color="tab:red")
        cpu.set(title=f"{title}: server", xlabel="s", ylabel="CPU % of one core")
        rss = cpu.twinx()
        rss.plot(t, [s["rss_kb"] / 1024 for s in series], color="tab:blue")
        rss.set_ylabel("RSS MiB")
        figure.savefig(f"{base}-resources.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(f"{base}-resources.png")
    return written
