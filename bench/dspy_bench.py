"""DSPy bridge benchmark: per-call overhead against DSPy in-process, and batch throughput.

``python -m bench.dspy_bench [--quick] [--repeats N]``

Measured in one run:

* **per-call overhead**: a ``dspy.Predict("question -> answer")`` program on DSPy's ``DummyLM``,
  called ``--calls`` times in this process and through ``MLBridge.execute_resource`` (a pool of
  one worker, the same program and scripted model there). The two sides alternate in rounds; the
  overhead is bridge median minus in-process median per call (the wire, the host, the worker
  runtime and the bridge's output handling).
* **batch throughput**: ``execute_resource(rid, {"batch": [...]})`` on pools of 1, 2 and 4
  workers (the worker that receives the batch hands items to the others through the host), with
  two models: ``DummyLM`` (no latency: the bridge's own cost dominates) and a scripted model that
  takes 50 ms a call, like a remote provider (where a pool pays off). Items per second.

The markdown table is printed and written to ``bench/results/dspy.md``. DSPy's disk cache is
pointed at a temporary folder; no network is used.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="mlbridge-bench-dspy-"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
from dspy.clients.engines.dummy_engine import DummyEngine
from dspy.utils.dummies import DummyLM

from mlbridge import BridgeConfig, BridgeOptions, MLBridge, MLBridgeConfig

RESULTS = Path(__file__).resolve().parent / "results" / "dspy.md"
ROOT = Path(__file__).resolve().parent.parent
ANSWERS = {f"question {i}": {"answer": f"answer {i}"} for i in range(64)}
DUMMY = {"class": "dspy.utils.dummies:DummyLM", "kwargs": {"answers": ANSWERS}}
LATENCY_S = 0.05


class _LatencyEngine:
    def __init__(self, answers: Any, latency_s: float) -> None:
        self._engine = DummyEngine(DummyLM(answers))
        self.latency_s = latency_s

    def complete(self, request: Any) -> Any:
        time.sleep(self.latency_s)
        return self._engine.complete(request)

    def stream(self, request: Any) -> Iterator[Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LatencyLM(dspy.LM):  # type: ignore[misc]
    """DummyLM's scripted answers, each after ``latency_s`` (a stand-in for a remote provider)."""

    def __init__(self, answers: Any, latency_s: float = LATENCY_S) -> None:
        super().__init__(
            "scripted/latency",
            engine=_LatencyEngine(answers, latency_s),
            cache=False,
            num_retries=0,
        )


SLOW = {"class": "bench.dspy_bench:LatencyLM", "kwargs": {"answers": ANSWERS}}


def _config(pool_size: int) -> MLBridgeConfig:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    bridge = BridgeConfig(
        "dspy",
        python_module="dspy",
        pool_size=pool_size,
        overflow=0,
        env={"PYTHONPATH": path, "DSPY_CACHEDIR": os.environ["DSPY_CACHEDIR"]},
        options=BridgeOptions(timeout=300.0, startup_timeout=120.0),
    )
    return MLBridgeConfig(bridges={"dspy": bridge}, default_bridge="dspy")


def per_call(calls: int, repeats: int) -> dict[str, Any]:
    program = dspy.Predict("question -> answer")
    lm = DummyLM(ANSWERS)
    inputs = [{"question": f"question {i % 64}"} for i in range(calls)]

    def local() -> list[float]:
        out = []
        with dspy.context(lm=lm):
            for item in inputs:
                t0 = time.perf_counter()
                program(**item)
                out.append(time.perf_counter() - t0)
        return out

    with MLBridge(_config(1), env_overrides=False) as b:
        rid = b.create_resource("dspy", "program", {"signature": "question -> answer", "lm": DUMMY})
        for item in inputs[:20]:  # warm both sides
            b.execute_resource("dspy", rid, item)
        local()

        def bridged() -> list[float]:
            out = []
            for item in inputs:
                t0 = time.perf_counter()
                b.execute_resource("dspy", rid, item)
                out.append(time.perf_counter() - t0)
            return out

        bridge_s: list[float] = []
        local_s: list[float] = []
        for r in range(repeats):
            order = (bridged, local) if r % 2 == 0 else (local, bridged)
            for fn in order:
                (bridge_s if fn is bridged else local_s).extend(fn())
    b_med, l_med = statistics.median(bridge_s), statistics.median(local_s)
    return {
        "calls": len(bridge_s),
        "bridge_us": b_med * 1e6,
        "local_us": l_med * 1e6,
        "overhead_us": (b_med - l_med) * 1e6,
        "ratio": b_med / l_med,
    }


def batch_rate(pool_size: int, lm: dict[str, Any], items: int, repeats: int) -> float:
    batch = [{"question": f"question {i % 64}"} for i in range(items)]
    with MLBridge(_config(pool_size), env_overrides=False) as b:
        rid = b.create_resource("dspy", "program", {"signature": "question -> answer", "lm": lm})
        b.execute_resource("dspy", rid, {"batch": batch[: max(2, pool_size)]})  # warm copies
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = b.execute_resource("dspy", rid, {"batch": batch}, timeout=300)
            seconds = time.perf_counter() - t0
            assert out["count"] == items
            best = max(best, items / seconds)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dspy_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer calls and items")
    p.add_argument("--repeats", type=int, default=None)
    ns = p.parse_args(argv)
    repeats = ns.repeats or (2 if ns.quick else 4)
    calls = 100 if ns.quick else 300
    fast_items, slow_items = (32, 16) if ns.quick else (128, 48)

    t_start = time.perf_counter()
    pc = per_call(calls, repeats)
    rows = []
    for pool in (1, 2, 4):
        fast = batch_rate(pool, DUMMY, fast_items, repeats)
        slow = batch_rate(pool, SLOW, slow_items, repeats)
        rows.append((pool, fast, slow))
        print(f"pool {pool}: {fast:.0f} items/s (DummyLM), {slow:.1f} items/s (50 ms LM)")

    base_fast, base_slow = rows[0][1], rows[0][2]
    lines = [
        "# DSPy bridge benchmark",
        "",
        f"Python {platform.python_version()}, dspy {dspy.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}; {repeats} rounds; "
        f"{time.perf_counter() - t_start:.0f}s in all.",
        "",
        "## Per-call overhead: Predict on DummyLM, one worker vs in-process (same run)",
        "",
        "| side | median per call | |",
        "|---|---|---|",
        f"| in-process DSPy | {pc['local_us']:.0f} us | |",
        f"| through MLBridge | {pc['bridge_us']:.0f} us | {pc['ratio']:.2f}x |",
        f"| **overhead** | **{pc['overhead_us']:.0f} us per call** | {pc['calls']} calls |",
        "",
        "## Batch throughput: execute_resource(rid, {'batch': [...]}), items per second",
        "",
        f"| pool size | DummyLM ({fast_items} items) | vs 1 | "
        f"{LATENCY_S * 1000:.0f} ms LM ({slow_items} items) | vs 1 |",
        "|---|---|---|---|---|",
    ]
    for pool, fast, slow in rows:
        lines.append(
            f"| {pool} | {fast:.0f} | {fast / base_fast:.2f}x | {slow:.1f} | "
            f"{slow / base_slow:.2f}x |"
        )
    lines += [
        "",
        "The worker that receives a batch runs items itself and hands others (with the program's",
        "config and state) to the pool's other workers through the host. With the 50 ms model",
        "the pool overlaps waiting; with DummyLM each item costs a few ms of CPU, so the machine's",
        "CPU count bounds the gain.",
    ]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
