"""``python -m bench [--quick]`` (also ``mlbridge bench``): every benchmark module, in one run.

Runs, in order, each module of :data:`MODULES` that is present (each entry says what it
measures; one whose framework is not installed is skipped, saying so). Each module exposes
``main(argv) -> int`` and writes its markdown table under ``bench/results/``.

Each runs as ``python -m <module>`` in its own process, with a time limit: a module that hangs
or crashes is reported and the others still run, and no module's pools, event loops or imported
frameworks skew the next one's numbers. The exit code is the worst of theirs (124: timed out).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

# (module, import names it needs beyond mlbridge itself)
MODULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # the wire protocol and worker runtime against a raw pipe loop
    ("bench.protocol", ()),
    # the host and API against the raw loop and the standard library's process pools
    ("bench.host", ()),
    # real models: Transformers in-process against the same work through the bridge
    ("bench.transformers_bench", ("torch", "transformers")),
    # the DSPy bridge against DSPy in-process, and batch throughput by pool size
    ("bench.dspy_bench", ("dspy",)),
    # LangChain invoke overhead and time to the first streamed chunk against in-process
    ("bench.langchain_bench", ("langchain_core",)),
    # the ray backend against a plain Ray actor method call and the local backend
    ("bench.ray_bench", ("ray",)),
    # a sandboxed `function` call against the same function in a plain bridge
    ("bench.sandbox_bench", ("RestrictedPython",)),
    # an HTTP request through `mlbridge serve` against a direct call; requests/s, 64 clients
    ("bench.gateway_bench", ("fastapi", "uvicorn", "httpx")),
    # what the dashboard feed and OpenTelemetry spans cost a call; the /metrics render time
    ("bench.observability", ("fastapi", "opentelemetry.sdk")),
    # shared-memory payloads (1/16/256 MiB arrays) and result-cache hits against misses
    ("bench.shm_bench", ("numpy",)),
    # warm start: a pool of 4 Transformers workers forked from a template against a cold start
    ("bench.fork_bench", ("torch", "transformers")),
)


ROOT = Path(__file__).resolve().parent.parent  # the checkout: `bench` is importable from here
TIMEOUT_S = {"quick": 900.0, "full": 3600.0}  # per module


def _present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer iterations in every module")
    ns = p.parse_args(argv)
    sub_argv = ["--quick"] if ns.quick else []
    worst = 0
    summary: list[str] = []
    for name, needs in MODULES:
        if not _present(name):
            summary.append(f"{name}: skipped (module not present)")
            continue
        missing = [n for n in needs if not _present(n)]
        if missing:
            summary.append(f"{name}: skipped ({', '.join(missing)} not installed)")
            continue
        print(f"\n=== {name} {' '.join(sub_argv)}".rstrip(), flush=True)
        limit = TIMEOUT_S["quick" if ns.quick else "full"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        t0 = time.perf_counter()
        try:
            code = subprocess.run(
                [sys.executable, "-m", name, *sub_argv], cwd=ROOT, env=env, timeout=limit
            ).returncode
            note = f"exit {code}"
        except subprocess.TimeoutExpired:
            code, note = 124, f"killed after the {limit:.0f}s limit"
        summary.append(f"{name}: {note} in {time.perf_counter() - t0:.0f}s")
        worst = max(worst, code)
    print("\n=== summary")
    for line in summary:
        print(f"  {line}")
    return worst


if __name__ == "__main__":
    sys.exit(main())
