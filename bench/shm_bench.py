"""Performance benchmark (issue 15): shared-memory payloads and the result cache.

``python -m bench.shm_bench [--quick] [--check]``

In one run, on the same machine state:

* **numpy round trip**: ``MLBridge.execute(bridge, command, {"a": array})`` of a float64 array
  of 1, 16 and 256 MiB, answered with an array equal to it. Rate = array bytes / median round
  trip (the whole ``execute``: encode, both directions, decode; the caller does not read the
  result). Four ways, interleaved per size:

  - *pipe*: ``shm_threshold_bytes = 0``, the bytes go through the pipe (``max_frame_bytes``
    raised so the 256 MiB frame is not refused): the baseline;
  - *one-shot files*: shared memory without a pool (``shm_pool_bytes = 0``): a new ``/dev/shm``
    file each way, as before pools;
  - *pooled, echo*: the defaults, the built-in ``echo`` returns the array it received: the host
    copies it into a pooled segment, the reply goes back as a handle of that same segment (one
    copy per round trip);
  - *pooled, copy*: the defaults, :mod:`bench.shm_copy_bridge` returns a new array: the worker
    copies it into its own pooled segment (two copies per round trip).

* **small calls**: p50 of a small ``echo`` with and without shared memory (must not regress).
* **result cache**: p50 of a repeated cacheable ``count`` call answered from the cache, against
  the same call with ``cache=False``.

Targets (from the issue): 16 MiB and 256 MiB round trips >= 2 GB/s (pooled echo), 16 MiB >= 5x
the pipe's rate, small calls within 10 % of the pipe-only host. The markdown is printed and
written to ``bench/results/perf.md``; ``--check`` makes a missed target exit 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mlbridge import MLBridge
from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig

RESULTS = Path(__file__).parent / "results" / "perf.md"
MiB = 1 << 20


COPY_BRIDGE = str(Path(__file__).resolve().parent / "shm_copy_bridge.py")


def _bridge(script: str | None = None, **options: Any) -> MLBridge:
    opts = BridgeOptions(timeout=600.0, health_check_interval=0.0, **options)
    if script is None:
        bc = BridgeConfig("echo", python_module="echo", options=opts)
    else:
        bc = BridgeConfig("echo", python_script=script, options=opts)
    b = MLBridge(MLBridgeConfig({"echo": bc}), env_overrides=False)
    b.execute("echo", "ping", {})
    return b


def _median(fn: Callable[[], Any], rounds: int) -> float:
    fn()  # warm-up (first-touch of buffers)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _p50(fn: Callable[[], Any], n: int, warmup: int = 200) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _p50_small(b: MLBridge, n: int) -> float:
    args = {"x": 1, "s": "hello"}
    return _p50(lambda: b.execute("echo", "echo", args), n)


def run(quick: bool) -> tuple[str, bool]:
    sizes = [1 * MiB, 16 * MiB, 256 * MiB]
    rounds = {
        1 * MiB: 20 if quick else 50,
        16 * MiB: 5 if quick else 15,
        256 * MiB: 2 if quick else 5,
    }
    small_n = 2000 if quick else 10000
    shm = _bridge()
    pipe = _bridge(shm_threshold_bytes=0, max_frame_bytes=1 << 30)
    once = _bridge(shm_pool_bytes=0)
    copy = _bridge(COPY_BRIDGE)
    ways = (("pipe", pipe, "echo"), ("once", once, "echo"), ("shm", shm, "echo"))
    ways += (("copy", copy, "copy"),)
    rates: dict[tuple[str, int], float] = {}
    try:
        for size in sizes:
            a = np.random.default_rng(size).standard_normal(size // 8)
            for label, b, command in ways:
                got = b.execute("echo", command, {"a": a})["a"]
                assert np.array_equal(got, a), "the round trip changed the array"
                del got
                t = _median(
                    lambda b=b, c=command, a=a: b.execute("echo", c, {"a": a}), rounds[size]
                )
                rates[(label, size)] = size / t
            del a
        small = {}
        for _ in range(4):  # interleaved, four times: background load hits both alike
            for label, b in (("pipe", pipe), ("shm", shm)):
                small.setdefault(label, []).append(_p50_small(b, small_n // 4))
        small_p50 = {k: min(v) for k, v in small.items()}
    finally:
        for _, b, _ in ways:
            b.close()
    cached = _bridge(cache_ttl=600.0)
    try:
        args = {"q": "bench", "pad": list(range(100))}
        cached.execute("echo", "count", args)
        hit = _p50(lambda: cached.execute("echo", "count", args), small_n)
        miss = _p50(lambda: cached.execute("echo", "count", args, cache=False), small_n)
    finally:
        cached.close()

    r16 = rates[("shm", 16 * MiB)]
    r256 = rates[("shm", 256 * MiB)]
    p16 = rates[("pipe", 16 * MiB)]
    regress = small_p50["shm"] / small_p50["pipe"]
    targets = [
        ("16 MiB round trip >= 2 GB/s", f"{r16 / 1e9:.2f} GB/s", r16 >= 2e9),
        ("256 MiB round trip >= 2 GB/s", f"{r256 / 1e9:.2f} GB/s", r256 >= 2e9),
        ("16 MiB shm >= 5x pipe", f"{r16 / p16:.1f}x", r16 >= 5 * p16),
        ("small call p50 shm <= 1.1x pipe", f"{regress:.2f}x", regress <= 1.1),
        ("cache hit p50 < miss p50", f"{hit / miss:.2f}x", hit < miss),
    ]
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    lines = [
        "## Performance benchmark: shared memory and result cache"
        f" ({'quick' if quick else 'full'})",
        "",
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.release()}; load average {load} at the end.",
        "",
        "numpy float64 array sent to a worker and back through `MLBridge.execute` (rate = "
        "array bytes / median round trip; the worker answers with an equal array):",
        "",
        "| size | pipe (shm off) MB/s | one-shot files MB/s | pooled, echo MB/s "
        "| pooled, worker copies MB/s | echo vs pipe | echo vs one-shot |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        p, o, s, c = (rates[(k, size)] for k in ("pipe", "once", "shm", "copy"))
        lines.append(
            f"| {size >> 20} MiB | {p / 1e6:,.0f} | {o / 1e6:,.0f} | {s / 1e6:,.0f} "
            f"| {c / 1e6:,.0f} | {s / p:.1f}x | {s / o:.1f}x |"
        )
    lines += [
        "",
        f"Small echo p50: pipe-only host {small_p50['pipe'] * 1e6:.1f} µs, with shared memory "
        f"{small_p50['shm'] * 1e6:.1f} µs. Result cache: a hit {hit * 1e6:.1f} µs, the same "
        f"call with cache=False {miss * 1e6:.1f} µs.",
        "",
        "| target | measured | result |",
        "|---|---:|---|",
    ]
    for label, measured, ok in targets:
        lines.append(f"| {label} | {measured} | {'PASS' if ok else 'MISS'} |")
    return "\n".join(lines) + "\n", all(ok for _, _, ok in targets)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.shm_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ns = p.parse_args(argv)
    text, ok = run(ns.quick)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")
    print(f"(written to {RESULTS})")
    return 0 if ok or not ns.check else 1


if __name__ == "__main__":
    sys.exit(main())
