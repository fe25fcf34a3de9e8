"""Warm-start benchmark (issue 15, item 1): ``start = "fork"`` against spawned workers.

``python -m bench.fork_bench [--quick] [--check]``

In one run, on the same machine state, with the built-in Transformers bridge (no model loaded:
a worker is ready once torch and Transformers are imported and its ``hello`` is answered):

* **cold start**: one spawned worker (``start = "spawn"``), from host start to a ready pool;
* **fork pool of 4**: four workers with ``start = "fork"``, from host start to all four ready
  (the template's one import included);
* **spawn pool of 4**: the same four workers spawned, for reference;
* **replacement after kill -9**: SIGKILL one worker of a ready pool, time until a new worker is
  ready (the default ``restart_backoff`` of 0.1 s included), for fork and for spawn.

Targets (from the issue): the fork pool of 4 ready in <= 1.3x one worker's cold start, and a
forked replacement ready in under 0.5 s. The markdown is printed and written to
``bench/results/fork.md``; ``--check`` makes a missed target exit 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mlbridge import MLBridge
from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig

RESULTS = Path(__file__).parent / "results" / "fork.md"


def _cfg(start: str, pool_size: int, cache: str) -> MLBridgeConfig:
    bridge = BridgeConfig(
        "hf",
        python_module="transformers",
        pool_size=pool_size,
        settings={"model_cache_dir": cache, "threads": 1},
        options=BridgeOptions(lazy=False, start=start, startup_timeout=300.0),
    )
    return MLBridgeConfig(bridges={"hf": bridge}, default_bridge="hf")


def _workers(b: MLBridge) -> list[int]:
    return [int(w["pid"]) for w in b.statistics()["pools"]["hf"]["workers"]]


def _wait(pred: Callable[[], bool], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("the pool did not get ready")
        time.sleep(0.002)


def time_to_ready(start: str, pool_size: int, cache: str) -> float:
    t0 = time.perf_counter()
    with MLBridge(_cfg(start, pool_size, cache)) as b:
        _wait(lambda: len(_workers(b)) == pool_size)
        return time.perf_counter() - t0


def replacements(start: str, rounds: int, cache: str) -> list[float]:
    out: list[float] = []
    with MLBridge(_cfg(start, 2, cache)) as b:
        _wait(lambda: len(_workers(b)) == 2)
        for _ in range(rounds):
            victim = _workers(b)[0]
            t0 = time.perf_counter()
            os.kill(victim, signal.SIGKILL)

            def replaced(v: int = victim) -> bool:
                ws = _workers(b)
                return v not in ws and len(ws) == 2

            _wait(replaced)
            out.append(time.perf_counter() - t0)
    return out


def run(quick: bool) -> tuple[str, bool]:
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory() as cache:
        time_to_ready("spawn", 1, cache)  # warm the page cache so the first row is not penalised
        cold = statistics.median(time_to_ready("spawn", 1, cache) for _ in range(rounds))
        fork4 = statistics.median(time_to_ready("fork", 4, cache) for _ in range(rounds))
        spawn4 = time_to_ready("spawn", 4, cache)
        rep_fork = statistics.median(replacements("fork", 3 if quick else 7, cache))
        rep_spawn = statistics.median(replacements("spawn", 1 if quick else 3, cache))
    ratio = fork4 / cold
    ok = ratio <= 1.3 and rep_fork < 0.5
    lines = [
        '## Warm start: `start = "fork"` (Transformers bridge, no model loaded)',
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; medians of {rounds} run(s) "
        "(replacements: 3-7 kills).",
        "",
        "| measurement | seconds | ratio | target |",
        "|---|---:|---:|---|",
        f"| cold start, 1 spawned worker | {cold:.2f} | 1.00x | baseline |",
        f'| pool of 4, `start = "fork"` | {fork4:.2f} | {ratio:.2f}x | <= 1.3x '
        f"{'met' if ratio <= 1.3 else 'MISSED'} |",
        f'| pool of 4, `start = "spawn"` | {spawn4:.2f} | {spawn4 / cold:.2f}x | reference |',
        f"| replacement after kill -9, fork | {rep_fork:.3f} | | < 0.5 s "
        f"{'met' if rep_fork < 0.5 else 'MISSED'} |",
        f"| replacement after kill -9, spawn | {rep_spawn:.3f} | | reference |",
        "",
    ]
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.fork_bench", description=__doc__.split("\n")[0]
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
