"""Sandbox benchmark: a sandboxed ``function`` call against the same function in a plain bridge.

``python -m bench.sandbox_bench [--quick]``

Both sides hold the same source as a ``function`` resource and are called through
``MLBridge.execute_resource`` (a pool of one worker each):

* **plain**: :mod:`bench.sandbox_plain_bridge`, which ``exec``s the source as ordinary Python in
  an ordinary worker (no RestrictedPython, no limits, no isolation);
* **sandbox**: the built-in ``sandbox`` bridge with its defaults (RestrictedPython guards,
  cgroup or rlimit limits, network namespace, empty environment, private directory, read-only
  file system, user nobody where the host is root).

Two functions: ``tiny`` (a few operations: the per-call cost of the path) and ``loop`` (10 000
loop iterations with ``+=``: the guards RestrictedPython adds to iteration and in-place
operators). The sides alternate in rounds; medians per call and the ratio sandbox / plain, all
from the same run. Also each pool's start (``start_bridge`` to the first answer). The table is
printed and written to ``bench/results/sandbox.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from mlbridge import MLBridge, MLBridgeConfig

RESULTS = Path(__file__).resolve().parent / "results" / "sandbox.md"
PLAIN = str(Path(__file__).resolve().parent / "sandbox_plain_bridge.py")
FUNCTIONS = {
    "tiny": "def tiny(x):\n    return x * 2 + 1\n",
    "loop": (
        "def loop(n):\n"
        "    total = 0\n"
        "    for i in range(n):\n"
        "        total += i % 7\n"
        "    return total\n"
    ),
}
ARGS = {"tiny": [20], "loop": [10_000]}


def _start(b: MLBridge, name: str, **kw: object) -> float:
    t0 = time.perf_counter()
    b.start_bridge(name, **kw)  # type: ignore[arg-type]
    b.execute(name, "ping")
    return time.perf_counter() - t0


def run(quick: bool) -> str:
    rounds, per_round = (5, 40) if quick else (15, 100)
    with MLBridge(MLBridgeConfig(bridges={})) as b:
        start = {
            "plain": _start(b, "plain", python_script=PLAIN, timeout=60.0),
            "sandbox": _start(b, "sandbox", python_module="sandbox", timeout=60.0),
        }
        rids = {
            (side, fn): b.create_resource(side, "function", {"code": code, "name": fn})
            for side in ("plain", "sandbox")
            for fn, code in FUNCTIONS.items()
        }
        for (side, fn), rid in rids.items():  # warm up, and check both agree
            assert b.execute_resource(side, rid, {"args": ARGS[fn]}) == b.execute_resource(
                "plain", rids[("plain", fn)], {"args": ARGS[fn]}
            )
        samples: dict[tuple[str, str], list[float]] = {k: [] for k in rids}
        for _ in range(rounds):
            for (side, fn), rid in rids.items():
                inputs = {"args": ARGS[fn]}
                t0 = time.perf_counter()
                for _ in range(per_round):
                    b.execute_resource(side, rid, inputs)
                samples[(side, fn)].append((time.perf_counter() - t0) / per_round)
        mech = b.execute("sandbox", "get_info")["isolation"]["mechanisms"]
    med = {k: statistics.median(v) for k, v in samples.items()}
    lines = [
        "# Sandbox: a sandboxed function call vs the same function in a plain bridge",
        "",
        f"Python {platform.python_version()}, {platform.machine()}; {rounds} rounds of "
        f"{per_round} calls per side and function, sides alternating; medians per call. "
        "Measured on a shared machine: compare the columns of one run, not runs.",
        "",
        "| function | plain bridge | sandbox bridge | sandbox / plain |",
        "|---|---:|---:|---:|",
    ]
    for fn in FUNCTIONS:
        p, s = med[("plain", fn)], med[("sandbox", fn)]
        lines.append(f"| {fn} | {p * 1e6:.0f} µs | {s * 1e6:.0f} µs | {s / p:.2f}x |")
    lines += [
        "",
        f"Pool start (start_bridge to the first answer): plain {start['plain'] * 1000:.0f} ms, "
        f"sandbox {start['sandbox'] * 1000:.0f} ms.",
        "",
        "Sandbox mechanisms in force: " + "; ".join(f"{k}: {v}" for k, v in mech.items()) + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.sandbox_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="fewer iterations (about 15 s)")
    ns = p.parse_args(argv)
    text = run(ns.quick)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")
    print(f"(written to {RESULTS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
