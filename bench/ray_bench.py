"""Ray backend benchmark: a call through a Ray-hosted worker against a plain Ray actor call.

``python -m bench.ray_bench [--quick] [--check]``

On one local Ray cluster started here (``ray.init(num_cpus=4)``, no dashboard), in one run:

* **sequential round trip** (p50, p99) of a small ``echo`` through ``MLBridge`` with
  ``backend = "ray"``, against a **plain Ray actor** whose method returns its argument (the same
  echo, ``ray.get(actor.echo.remote(payload))``), and against ``MLBridge`` with the ``local``
  backend. Measured in interleaved blocks (the order rotates) so background load hits all alike.
* **time to a ready pool of 4 Ray workers**: a fresh host, ``start_bridge(pool_size=4,
  lazy=False, backend="ray")`` until it returns (actors created, workers answered ``hello``),
  median of a few.

Target: the Ray backend's p50 <= 1.3x the plain actor call's. Written to
``bench/results/ray.md``; ``--check`` makes a missed target exit 1.
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

from mlbridge._api import MLBridge
from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig

RESULTS = Path(__file__).resolve().parent / "results" / "ray.md"
PAYLOAD: dict[str, Any] = {"text": "hello world", "n": 42, "ok": True, "values": [1.5, 2.5, 3.5]}
TARGET = 1.3


class EchoActor:
    def echo(self, payload: Any) -> Any:
        return payload


def _cfg(name: str, backend: str, pool_size: int = 1) -> BridgeConfig:
    return BridgeConfig(
        name,
        python_module="echo",
        pool_size=pool_size,
        options=BridgeOptions(backend=backend, lazy=False, health_check_interval=0),
    )


def _measure(
    fns: dict[str, Callable[[], Any]], blocks: int, per_block: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for b in range(blocks):
        order = names[b % len(names) :] + names[: b % len(names)]
        for name in order:
            fn = fns[name]
            for _ in range(per_block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ray_bench")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--check", action="store_true")
    ns = p.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from mlbridge._backends import ray as ray_backend

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="mlbridge")
    ray_backend.configure(None)
    try:
        blocks, per_block = (6, 100) if ns.quick else (12, 300)
        actor = ray.remote(EchoActor).options(num_cpus=0.5).remote()
        ray.get(actor.echo.remote(PAYLOAD))
        cfg = MLBridgeConfig(
            bridges={"r": _cfg("r", "ray"), "l": _cfg("l", "local")}, default_bridge="r"
        )
        with MLBridge(cfg) as b:
            fns: dict[str, Callable[[], Any]] = {
                "plain Ray actor method call": lambda: ray.get(actor.echo.remote(PAYLOAD)),
                "MLBridge, backend ray": lambda: b.execute("r", "echo", PAYLOAD),
                "MLBridge, backend local": lambda: b.execute("l", "echo", PAYLOAD),
            }
            for fn in fns.values():  # warm up
                for _ in range(50):
                    fn()
            times = _measure(fns, blocks, per_block)
        ray.kill(actor)

        ready: list[float] = []
        for i in range(2 if ns.quick else 4):
            t0 = time.perf_counter()
            with MLBridge(MLBridgeConfig(bridges={"p": _cfg("p", "ray", 4)})) as b:
                ready.append(time.perf_counter() - t0)
                assert len(b.statistics().pools["p"].workers) == 4, i
    finally:
        ray.shutdown()

    base = statistics.median(times["plain Ray actor method call"])
    lines = [
        "# Ray backend",
        "",
        f"{platform.node()} · {os.cpu_count()} CPUs · Python {platform.python_version()} · "
        f"ray {ray.__version__} · {blocks}x{per_block} calls each, interleaved · "
        "machine shared with other jobs: compare the ratios, measured in the same run",
        "",
        "| path | p50 (µs) | p99 (µs) | p50 vs plain actor call |",
        "|---|---:|---:|---:|",
    ]
    for name, xs in times.items():
        p50 = statistics.median(xs)
        lines.append(
            f"| {name} | {p50 * 1e6:.0f} | {_pct(xs, 0.99) * 1e6:.0f} | {p50 / base:.2f}x |"
        )
    ratio = statistics.median(times["MLBridge, backend ray"]) / base
    local = statistics.median(times["MLBridge, backend ray"]) / statistics.median(
        times["MLBridge, backend local"]
    )
    ok = ratio <= TARGET
    each = ", ".join(f"{r:.2f}" for r in ready)
    lines += [
        "",
        f"Ray backend vs plain actor call: {ratio:.2f}x (target <= {TARGET}x: "
        f"{'met' if ok else 'MISSED'}); vs the local backend: {local:.2f}x.",
        "",
        f"Time to a ready pool of 4 Ray workers (fresh host, cluster running): median "
        f"{statistics.median(ready):.2f}s of {len(ready)} ({each}).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")
    return 1 if ns.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
