"""Host benchmark: a call through ``AsyncMLBridge`` / ``MLBridge`` against the alternatives.

``python -m bench.host [--quick] [--check]``

In one run, on the same machine state:

* **sequential round trip** (p50, p99) of a small ``echo`` through ``AsyncMLBridge`` and
  ``MLBridge``, against the floor (a *raw pipe loop*: a minimal length-prefixed MessagePack echo
  subprocess driven synchronously with ``os.write``/``os.read``), and against the standard
  library's process pools doing the same echo (``concurrent.futures.ProcessPoolExecutor(1)`` and
  ``multiprocessing.Pool(1)`` calling a top-level ``echo`` function). The five are measured in
  interleaved blocks (the order rotates) so background load hits them alike.
* **throughput** (calls/s) of ``AsyncMLBridge`` with 1, 2 and 4 workers under 64 concurrent
  callers (asyncio tasks).
* **time to a ready pool of 4 workers**: ``start_bridge(pool_size=4, lazy=False)``, median of a
  few fresh hosts (``multiprocessing.Pool(4)`` ready-to-serve time for reference: it forks).

Targets: async p50 <= 2x the raw loop, sync p50 <= 3x, both at most half of
``ProcessPoolExecutor``'s p50; restricted to one CPU (``taskset -c 0``: host, workers and raw loop
share it, so no polling hides the host's own cost) both APIs <= 2x. The markdown table is printed
and written to ``bench/results/host.md``. ``--check`` makes a missed target exit 1.

Run as ``python -m bench.host``, the module re-executes itself once with address-space layout
randomisation off (``bench/_layout.py`` says why; ``--aslr`` keeps it on).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlbridge._api import AsyncMLBridge, MLBridge
from mlbridge._protocol.codec import get_codec
from mlbridge._protocol.framing import frame_header
from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig

from ._layout import fixed_layout, layout_note

RESULTS = Path(__file__).resolve().parent / "results" / "host.md"
PAYLOAD: dict[str, Any] = {"text": "hello world", "n": 42, "ok": True, "values": [1.5, 2.5, 3.5]}
CALLERS = 64
ASYNC_TARGET = 2.0  # async p50 <= 2x raw
SYNC_TARGET = 3.0  # sync p50 <= 3x raw
PPE_TARGET = 0.5  # "well under" ProcessPoolExecutor: at most half its p50
ONE_CPU_TARGET = 2.0  # on one CPU (taskset -c 0) both APIs: the host core's own cost
RAW = "raw pipe loop (msgpack)"

# The floor: one process, a pipe each way, 4-byte big-endian length + MessagePack, no threads.
RAW_ECHO = """
import os, sys
from mlbridge._protocol.codec import get_codec
codec = get_codec("msgpack")
def read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    return buf
while True:
    msg = codec.decode(read_exact(int.from_bytes(read_exact(4), "big")))
    out = codec.encode({"id": msg["id"], "success": True, "result": msg["args"]})
    data = memoryview(len(out).to_bytes(4, "big") + out)
    while data:
        data = data[os.write(1, data):]
"""


def _usable_cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def echo(args: Any) -> Any:
    """What the process pools run: the same job as the echo bridge's ``echo`` command."""
    return args


class RawLoop:
    """A synchronous length-prefixed client of one subprocess: by default the raw echo loop
    (:data:`RAW_ECHO`); with ``worker=True`` an mlbridge echo worker after a msgpack ``hello``."""

    def __init__(self, *, worker: bool = False) -> None:
        argv = [sys.executable, "-m", "mlbridge.worker", "echo"] if worker else ["-c", RAW_ECHO]
        if not worker:
            argv.insert(0, sys.executable)
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.wfd = self.proc.stdin.fileno()
        self.rfd = self.proc.stdout.fileno()
        self.rid = 0
        if worker:  # v1 speaks JSON until hello switches both sides to msgpack
            self.codec = get_codec("json")
            self.call({"protocol_version": 2, "codecs": ["msgpack"]}, command="hello")
        self.codec = get_codec("msgpack")

    def _read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = os.read(self.rfd, n - len(buf))
            if not chunk:
                raise EOFError("the raw echo process closed its output")
            buf += chunk
        return buf

    def call(self, args: Any, command: str = "echo") -> Any:
        self.rid += 1
        payload = self.codec.encode({"id": self.rid, "command": command, "args": args})
        os.write(self.wfd, frame_header(len(payload)) + payload)
        reply = self.codec.decode(self._read_exact(int.from_bytes(self._read_exact(4), "big")))
        assert reply["id"] == self.rid and reply["success"], reply
        return reply["result"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()


class AsyncRawLoop:
    """The raw echo loop driven from asyncio (``add_reader`` + a future per call): the floor
    for any asyncio host, before pools, workers' threads or bookkeeping."""

    def __init__(self) -> None:
        self.raw = RawLoop()
        os.set_blocking(self.raw.rfd, False)
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None

    def _on_readable(self) -> None:
        self.buf += os.read(self.raw.rfd, 65536)
        if len(self.buf) >= 4:
            n = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) >= 4 + n and self.waiter is not None:
                frame = bytes(self.buf[4 : 4 + n])
                del self.buf[: 4 + n]
                self.waiter.set_result(frame)

    async def block(self, n: int, out: list[float]) -> None:
        loop = asyncio.get_running_loop()
        raw = self.raw
        loop.add_reader(raw.rfd, self._on_readable)
        clock = time.perf_counter
        try:
            for _ in range(n):
                t0 = clock()
                raw.rid += 1
                self.waiter = loop.create_future()
                payload = raw.codec.encode({"id": raw.rid, "command": "echo", "args": PAYLOAD})
                os.write(raw.wfd, frame_header(len(payload)) + payload)
                reply = raw.codec.decode(await self.waiter)
                assert reply["id"] == raw.rid
                out.append(clock() - t0)
        finally:
            loop.remove_reader(raw.rfd)

    def close(self) -> None:
        self.raw.close()


class LoopThread:
    """An event loop in a thread, as ``MLBridge`` has: :meth:`hop` goes there and back."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def hop(self) -> None:
        lock = threading.Lock()
        lock.acquire()
        self.loop.call_soon_threadsafe(lock.release)
        lock.acquire()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def echo_config(name: str = "echo", pool_size: int = 1) -> MLBridgeConfig:
    cfg = BridgeConfig(
        name,
        python_module="echo",
        pool_size=pool_size,
        options=BridgeOptions(lazy=False, checkout_timeout=120.0),
    )
    return MLBridgeConfig(bridges={name: cfg}, default_bridge=name)


# --------------------------------------------------------------------------- latency


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Latency:
    label: str
    samples: list[float]

    @property
    def p50(self) -> float:
        return _pct(self.samples, 0.5)

    @property
    def p99(self) -> float:
        return _pct(self.samples, 0.99)


# Information only (uvloop is not a dependency): shown when installed, judged against nothing.
UVLOOP = "AsyncMLBridge.execute on uvloop"


def measure_latency(iterations: int, warmup: int) -> dict[str, Latency]:
    """Sequential round trips for the five ways, interleaved in blocks."""
    loop = asyncio.new_event_loop()
    raw = RawLoop()
    worker = RawLoop(worker=True)
    aio_raw = AsyncRawLoop()
    loop_thread = LoopThread()
    ppe = ProcessPoolExecutor(1)
    mp_pool = multiprocessing.Pool(1)
    sync_bridge = MLBridge(echo_config(), env_overrides=False)
    async_bridge = AsyncMLBridge(echo_config(), env_overrides=False)
    loop.run_until_complete(async_bridge.start())
    try:
        import uvloop

        uv_loop: asyncio.AbstractEventLoop | None = uvloop.new_event_loop()
    except ImportError:
        uv_loop = None
    uv_bridge = AsyncMLBridge(echo_config(), env_overrides=False)
    if uv_loop is not None:
        uv_loop.run_until_complete(uv_bridge.start())
    clock = time.perf_counter

    def block_async(n: int, out: list[float]) -> None:
        async def run() -> None:
            execute = async_bridge.execute
            for _ in range(n):
                t0 = clock()
                await execute("echo", "echo", PAYLOAD)
                out.append(clock() - t0)

        loop.run_until_complete(run())

    def block_uvloop(n: int, out: list[float]) -> None:
        async def run() -> None:
            execute = uv_bridge.execute
            for _ in range(n):
                t0 = clock()
                await execute("echo", "echo", PAYLOAD)
                out.append(clock() - t0)

        assert uv_loop is not None
        uv_loop.run_until_complete(run())

    def timed(fn: Callable[[], Any]) -> Callable[[int, list[float]], None]:
        def block(n: int, out: list[float]) -> None:
            for _ in range(n):
                t0 = clock()
                fn()
                out.append(clock() - t0)

        return block

    ways: dict[str, Callable[[int, list[float]], None]] = {
        RAW: timed(lambda: raw.call(PAYLOAD)),
        "AsyncMLBridge.execute": block_async,
        **({UVLOOP: block_uvloop} if uv_loop is not None else {}),
        "MLBridge.execute": timed(lambda: sync_bridge.execute("echo", "echo", PAYLOAD)),
        "ProcessPoolExecutor(1)": timed(lambda: ppe.submit(echo, PAYLOAD).result()),
        "multiprocessing.Pool(1)": timed(lambda: mp_pool.apply(echo, (PAYLOAD,))),
        # Where the time goes: the asyncio floor, and the worker runtime without the host.
        "(breakdown) raw loop, asyncio client": lambda n, out: loop.run_until_complete(
            aio_raw.block(n, out)
        ),
        "(breakdown) mlbridge worker, sync raw client": timed(lambda: worker.call(PAYLOAD)),
        "(breakdown) thread hop to a loop thread and back, no I/O": timed(loop_thread.hop),
    }
    try:
        for block in ways.values():  # warm every path (imports, caches, first fork)
            block(warmup, [])
        results = {label: Latency(label, []) for label in ways}
        blocks = 10
        per_block = max(1, iterations // blocks)
        labels = list(ways)
        for b in range(blocks):
            order = labels[b % len(labels) :] + labels[: b % len(labels)]
            for label in order:
                ways[label](per_block, results[label].samples)
        return results
    finally:
        loop.run_until_complete(async_bridge.close())
        loop.close()
        if uv_loop is not None:
            uv_loop.run_until_complete(uv_bridge.close())
            uv_loop.close()
        sync_bridge.close()
        mp_pool.close()
        mp_pool.join()
        ppe.shutdown()
        raw.close()
        worker.close()
        aio_raw.close()
        loop_thread.close()


# --------------------------------------------------------------------------- throughput


async def _throughput(workers: int, calls: int) -> float:
    async with AsyncMLBridge(echo_config(pool_size=workers), env_overrides=False) as bridge:
        for _ in range(3):  # every worker answered once before the clock starts
            await asyncio.gather(*(bridge.execute("echo", "echo", PAYLOAD) for _ in range(workers)))
        left = calls

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await bridge.execute("echo", "echo", PAYLOAD)

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        return calls / (time.perf_counter() - t0)


def measure_throughput(calls: int) -> dict[int, float]:
    return {w: asyncio.run(_throughput(w, calls)) for w in (1, 2, 4)}


# --------------------------------------------------------------------------- start-up


async def _ready_time() -> float:
    bridge = AsyncMLBridge(MLBridgeConfig(), env_overrides=False)
    await bridge.start()
    try:
        t0 = time.perf_counter()
        await bridge.start_bridge("echo4", python_module="echo", pool_size=4, lazy=False)
        elapsed = time.perf_counter() - t0
        stats = bridge.statistics()["pools"]["echo4"]
        assert stats["state"] == "ready" and len(stats["workers"]) == 4, stats
        return elapsed
    finally:
        await bridge.close()


def _mp_ready_time() -> float:
    t0 = time.perf_counter()
    with multiprocessing.Pool(4) as pool:
        pool.map(echo, range(4), chunksize=1)
        elapsed = time.perf_counter() - t0
    return elapsed


def measure_ready(repeats: int) -> tuple[float, float]:
    ours = [asyncio.run(_ready_time()) for _ in range(repeats)]
    theirs = [_mp_ready_time() for _ in range(repeats)]
    return statistics.median(ours), statistics.median(theirs)


# --------------------------------------------------------------------------- report


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def run(quick: bool) -> tuple[str, bool]:
    iterations, warmup, calls, repeats = (2000, 200, 5000, 3) if quick else (10000, 500, 30000, 5)
    lat = measure_latency(iterations, warmup)
    tput = measure_throughput(calls)
    ready, mp_ready = measure_ready(repeats)

    raw = lat[RAW].p50
    ppe = lat["ProcessPoolExecutor(1)"].p50
    a = lat["AsyncMLBridge.execute"].p50
    s = lat["MLBridge.execute"].p50
    targets = [
        (f"AsyncMLBridge p50 <= {ASYNC_TARGET:g}x raw loop", a / raw, a <= ASYNC_TARGET * raw),
        (f"MLBridge p50 <= {SYNC_TARGET:g}x raw loop", s / raw, s <= SYNC_TARGET * raw),
        (
            f"AsyncMLBridge p50 <= {PPE_TARGET:g}x ProcessPoolExecutor",
            a / ppe,
            a <= PPE_TARGET * ppe,
        ),
        (f"MLBridge p50 <= {PPE_TARGET:g}x ProcessPoolExecutor", s / ppe, s <= PPE_TARGET * ppe),
    ]
    if _usable_cpus() == 1:  # host, workers and raw loop share one CPU: nothing hides the host
        targets.append(
            (
                f"one CPU: MLBridge p50 <= {ONE_CPU_TARGET:g}x raw loop",
                s / raw,
                s <= ONE_CPU_TARGET * raw,
            )
        )
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    lines = [
        f"## Host benchmark ({'quick' if quick else 'full'})",
        "",
        f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs "
        f"({_usable_cpus()} usable by this run), {platform.system()} {platform.release()}; "
        f"load average {load} at the end; {layout_note()}.",
        "",
        f"Sequential round trip of a small echo ({iterations} calls each after {warmup} warm-up, "
        "interleaved in 10 blocks). Breakdown rows: the raw loop driven from asyncio (the floor "
        "for any asyncio host), the mlbridge echo worker driven by the raw loop's client "
        "(the worker runtime without the host), and the bare thread hop that a blocking API "
        "over an event-loop thread pays on top of the async path:",
        "",
        "| way | p50 µs | p99 µs | p50 vs raw | p99 vs raw |",
        "|---|---:|---:|---:|---:|",
    ]
    raw99 = lat[RAW].p99
    for r in lat.values():
        ratios = f"{r.p50 / raw:.2f}x | {r.p99 / raw99:.2f}x"
        lines.append(f"| {r.label} | {_us(r.p50)} | {_us(r.p99)} | {ratios} |")
    lines += [
        "",
        f"Throughput, AsyncMLBridge, {CALLERS} concurrent callers, {calls} calls:",
        "",
        "| workers | calls/s | vs 1 worker |",
        "|---:|---:|---:|",
    ]
    for w, rate in tput.items():
        lines.append(f"| {w} | {rate:,.0f} | {rate / tput[1]:.2f}x |")
    lines += [
        "",
        f"Time to a ready pool of 4 workers (median of {repeats}): "
        f"start_bridge(pool_size=4, lazy=False) {ready * 1000:.0f} ms; "
        f"multiprocessing.Pool(4) (fork, for reference) {mp_ready * 1000:.0f} ms.",
        "",
        "| target | measured | result |",
        "|---|---:|---|",
    ]
    for label, ratio, ok in targets:
        lines.append(f"| {label} | {ratio:.2f}x | {_verdict(ok)} |")
    return "\n".join(lines) + "\n", all(ok for _, _, ok in targets)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer iterations (about 20 s)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    p.add_argument(
        "--aslr",
        action="store_true",
        help="keep address-space layout randomisation on (see bench/_layout.py)",
    )
    ns = p.parse_args(argv)
    text, ok = run(ns.quick)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")
    print(f"(written to {RESULTS})")
    return 0 if ok or not ns.check else 1


if __name__ == "__main__":
    fixed_layout("bench.host", sys.argv[1:])
    sys.exit(main())
