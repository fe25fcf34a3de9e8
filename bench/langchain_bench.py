"""LangChain bridge benchmark: invoke overhead and time to the first streamed chunk, bridge vs
in-process, measured in the same run.

``python -m bench.langchain_bench [--quick] [--repeats N]``

* **invoke overhead**: a trivial chain, ``PromptTemplate("{q}") | FakeListChatModel |
  StrOutputParser``, invoked ``--calls`` times in this process and through
  ``MLBridge.execute_resource`` (a pool of one worker, the same chain built from its spec there).
  The two sides alternate in rounds; the overhead is bridge median minus in-process median per
  call (the wire, the host, the worker runtime and the bridge's input/output handling).
* **time to first chunk**: the same chain with a model that streams one character every 10 ms
  (``FakeListChatModel(sleep=0.01)``); the time from asking to the first chunk, in process
  (``chain.stream``) and through ``MLBridge.stream_resource``; and to the last chunk.

The markdown table is printed and written to ``bench/results/langchain.md``. No network is used.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import langchain_core
from langchain_core.language_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate

from mlbridge import BridgeConfig, BridgeOptions, MLBridge, MLBridgeConfig

RESULTS = Path(__file__).resolve().parent / "results" / "langchain.md"
FAKE = "langchain_core.language_models:FakeListChatModel"
STREAMED = "a streamed answer, one character at a time"
SLEEP_S = 0.01


def _config() -> MLBridgeConfig:
    bridge = BridgeConfig(
        "langchain",
        python_module="langchain",
        pool_size=1,
        overflow=0,
        options=BridgeOptions(timeout=300.0, startup_timeout=120.0),
    )
    return MLBridgeConfig(bridges={"langchain": bridge}, default_bridge="langchain")


def _chain(responses: list[str], sleep: float | None = None) -> Any:
    model = FakeListChatModel(responses=responses, sleep=sleep)
    return PromptTemplate.from_template("{q}") | model | StrOutputParser()


def _spec(responses: list[str], sleep: float | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"responses": responses}
    if sleep is not None:
        kwargs["sleep"] = sleep
    return {"prompt": "{q}", "llm": {"class": FAKE, "kwargs": kwargs}, "parser": "str"}


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _first_and_last(chunks: Iterable[Any]) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    for _ in chunks:
        if first is None:
            first = time.perf_counter() - t0
    return (first if first is not None else float("nan")), time.perf_counter() - t0


def measure(calls: int, streams: int, repeats: int) -> dict[str, Any]:
    local = _chain(["ok"])
    local_stream = _chain([STREAMED], SLEEP_S)
    bridge_s: list[float] = []
    local_s: list[float] = []
    first: dict[str, list[float]] = {"bridge": [], "local": []}
    last: dict[str, list[float]] = {"bridge": [], "local": []}
    with MLBridge(_config(), env_overrides=False) as b:
        rid = b.create_resource("langchain", "chain", _spec(["ok"]))
        sid = b.create_resource("langchain", "chain", _spec([STREAMED], SLEEP_S))
        for _ in range(20):  # warm both sides
            b.execute_resource("langchain", rid, {"q": "hi"})
            local.invoke({"q": "hi"})
        list(b.stream_resource("langchain", sid, {"q": "hi"}))

        def bridged() -> None:
            b.execute_resource("langchain", rid, {"q": "hi"})

        def in_process() -> None:
            local.invoke({"q": "hi"})

        for r in range(repeats):
            sides = [("bridge", bridged), ("local", in_process)]
            for name, fn in sides if r % 2 == 0 else sides[::-1]:
                (bridge_s if name == "bridge" else local_s).extend(_timed(fn, calls))
                for _ in range(streams):
                    if name == "bridge":
                        f, t = _first_and_last(b.stream_resource("langchain", sid, {"q": "hi"}))
                    else:
                        f, t = _first_and_last(local_stream.stream({"q": "hi"}))
                    first[name].append(f)
                    last[name].append(t)
    b_med, l_med = statistics.median(bridge_s), statistics.median(local_s)
    med = statistics.median
    return {
        "calls": len(bridge_s),
        "streams": len(first["bridge"]),
        "bridge_us": b_med * 1e6,
        "local_us": l_med * 1e6,
        "overhead_us": (b_med - l_med) * 1e6,
        "ratio": b_med / l_med,
        "first_bridge_ms": med(first["bridge"]) * 1e3,
        "first_local_ms": med(first["local"]) * 1e3,
        "last_bridge_ms": med(last["bridge"]) * 1e3,
        "last_local_ms": med(last["local"]) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.langchain_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer calls and streams")
    p.add_argument("--repeats", type=int, default=None)
    ns = p.parse_args(argv)
    repeats = ns.repeats or (2 if ns.quick else 4)
    calls, streams = (100, 5) if ns.quick else (300, 15)
    t_start = time.perf_counter()
    m = measure(calls, streams, repeats)
    lines = [
        "# LangChain bridge benchmark",
        "",
        f"Python {platform.python_version()}, langchain-core {langchain_core.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}; {repeats} rounds alternating the sides; "
        f"{time.perf_counter() - t_start:.0f}s in all.",
        "",
        "## Invoke overhead: prompt | FakeListChatModel | StrOutputParser, one worker",
        "",
        "| side | median per call | |",
        "|---|---|---|",
        f"| in-process `chain.invoke` | {m['local_us']:.0f} us | |",
        f"| `MLBridge.execute_resource` | {m['bridge_us']:.0f} us | {m['ratio']:.2f}x |",
        f"| **overhead** | **{m['overhead_us']:.0f} us per call** | {m['calls']} calls |",
        "",
        f"## Streaming: a model writing one character every {SLEEP_S * 1000:.0f} ms "
        f"({len(STREAMED)} chunks)",
        "",
        "| side | median time to first chunk | median time to last chunk |",
        "|---|---|---|",
        f"| in-process `chain.stream` | {m['first_local_ms']:.1f} ms | "
        f"{m['last_local_ms']:.0f} ms |",
        f"| `MLBridge.stream_resource` | {m['first_bridge_ms']:.1f} ms | "
        f"{m['last_bridge_ms']:.0f} ms |",
        f"| **difference** | **{m['first_bridge_ms'] - m['first_local_ms']:.1f} ms** | "
        f"{m['last_bridge_ms'] - m['last_local_ms']:.0f} ms ({m['streams']} streams each) |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
