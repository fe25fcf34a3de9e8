"""Observability benchmark: what metrics, the dashboard feed and tracing cost a host call.

``python -m bench.observability [--quick]``

In one run, on the same machine state, a small ``echo`` through ``AsyncMLBridge`` (sequential
round trips, p50 in microseconds) with:

* nothing installed (the host's own telemetry only: counters, latency and checkout-wait
  histograms, always on);
* the dashboard's telemetry hook (:class:`mlbridge.gateway.dashboard.DashboardFeed`);
* OpenTelemetry call spans on an SDK ``TracerProvider`` with no exporter (the span's cost, not
  an exporter's), the ``traceparent`` carried to the worker;

measured in interleaved blocks (the order rotates) so background load hits them alike; the same
for ``MLBridge`` untraced and traced (traced calls leave the caller-thread fast path). Then the
time to render ``/metrics`` (``GatewayMetrics.exposition``) for one pool of 4 workers with 20
command series. The markdown table is printed and written to ``bench/results/observability.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from opentelemetry.sdk.trace import TracerProvider

from mlbridge import AsyncMLBridge, MLBridge
from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig
from mlbridge.gateway.dashboard import DashboardFeed
from mlbridge.gateway.metrics import GatewayMetrics
from mlbridge.gateway.tracing import disable_call_spans, enable_call_spans

RESULTS = Path(__file__).resolve().parent / "results" / "observability.md"


def _config(pool_size: int = 1) -> MLBridgeConfig:
    cfg = BridgeConfig(
        "echo", python_module="echo", pool_size=pool_size, options=BridgeOptions(timeout=30.0)
    )
    return MLBridgeConfig(bridges={"echo": cfg}, default_bridge="echo")


def _p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


async def _async_rows(blocks: int, per_block: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"plain": [], "dashboard": [], "otel": []}
    provider = TracerProvider()
    async with AsyncMLBridge(_config()) as b:
        for _ in range(200):
            await b.execute("echo", "echo", {"x": 1})
        feed: DashboardFeed | None = None

        def plain() -> None:
            disable_call_spans()

        def dashboard() -> None:
            nonlocal feed
            disable_call_spans()
            feed = DashboardFeed(b)

        def otel() -> None:
            enable_call_spans(provider)

        setups: dict[str, Callable[[], None]] = {
            "plain": plain,
            "dashboard": dashboard,
            "otel": otel,
        }
        order = list(setups)
        for i in range(blocks):
            for label in order[i % 3 :] + order[: i % 3]:
                setups[label]()
                out = samples[label]
                for _ in range(per_block):
                    t0 = time.perf_counter()
                    await b.execute("echo", "echo", {"x": 1})
                    out.append(time.perf_counter() - t0)
                if feed is not None:
                    feed.remove_hook()
                    feed = None
        disable_call_spans()
    return samples


def _sync_rows(blocks: int, per_block: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"plain": [], "otel": []}
    provider = TracerProvider()
    with MLBridge(_config()) as b:
        for _ in range(200):
            b.execute("echo", "echo", {"x": 1})
        for i in range(blocks):
            for label in ("plain", "otel") if i % 2 == 0 else ("otel", "plain"):
                if label == "otel":
                    enable_call_spans(provider)
                else:
                    disable_call_spans()
                for _ in range(per_block):
                    t0 = time.perf_counter()
                    b.execute("echo", "echo", {"x": 1})
                    samples[label].append(time.perf_counter() - t0)
        disable_call_spans()
    return samples


async def _scrape_ms(rounds: int) -> float:
    async with AsyncMLBridge(_config(pool_size=4)) as b:
        for i in range(20):
            for _ in range(5):
                try:
                    await b.execute("echo", "echo" if i == 0 else f"cmd_{i}", {})
                except Exception:
                    pass
        metrics = GatewayMetrics(b)
        metrics.exposition()
        took = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            metrics.exposition()
            took.append(time.perf_counter() - t0)
        return statistics.median(took) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.observability")
    p.add_argument("--quick", action="store_true", help="fewer iterations")
    ns = p.parse_args(argv)
    blocks, per_block, rounds = (6, 300, 50) if ns.quick else (12, 1000, 200)
    a = asyncio.run(_async_rows(blocks, per_block))
    s = _sync_rows(blocks, per_block)
    scrape = asyncio.run(_scrape_ms(rounds))
    base_a, base_s = _p50_us(a["plain"]), _p50_us(s["plain"])
    rows = [
        ("AsyncMLBridge, host telemetry only", _p50_us(a["plain"]), base_a),
        ("AsyncMLBridge + dashboard feed hook", _p50_us(a["dashboard"]), base_a),
        ("AsyncMLBridge + OpenTelemetry call spans", _p50_us(a["otel"]), base_a),
        ("MLBridge, host telemetry only", _p50_us(s["plain"]), base_s),
        ("MLBridge + OpenTelemetry call spans", _p50_us(s["otel"]), base_s),
    ]
    lines = [
        f"Observability cost ({platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{blocks}x{per_block} calls per row, interleaved)",
        "",
        "| echo round trip | p50 (us) | vs. untraced |",
        "|---|---:|---:|",
        *(f"| {label} | {v:.1f} | {v / base:.2f}x |" for label, v, base in rows),
        "",
        f"`/metrics` render, 1 pool of 4 workers, 20 command series: {scrape:.2f} ms (median)",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
