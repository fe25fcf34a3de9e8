"""Pools through real echo workers: routing, concurrency, overflow, checkout, streaming, API."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_helpers import config, echo_cfg, pid_alive, wait_until
from mlbridge import errors
from mlbridge._api import AsyncMLBridge, MLBridge


@pytest.fixture
def bridge() -> Iterator[MLBridge]:
    b = MLBridge(config(echo_cfg(pool_size=2)))
    try:
        yield b
    finally:
        b.close()


def test_execute_returns_result_not_envelope(bridge: MLBridge) -> None:
    assert bridge.execute("echo", "echo", {"a": [1, 2], "b": "x"}) == {"a": [1, 2], "b": "x"}
    assert bridge.list_frameworks() == ["echo"]
    info = bridge.get_framework_info("echo")
    assert info["bridge"] == "echo" and info["framework"]["name"] == "echo"
    assert "echo" in info["commands"]


def test_pool_starts_lazily_then_concurrently(bridge: MLBridge) -> None:
    assert bridge.statistics()["pools"]["echo"]["state"] == "idle"
    bridge.execute("echo", "ping")
    stats = bridge.statistics()["pools"]["echo"]
    assert stats["state"] == "ready"
    pids = {w["pid"] for w in stats["workers"]}
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)


def test_many_threads_no_misrouted_replies(bridge: MLBridge) -> None:
    errors_seen: list[str] = []

    def caller(k: int) -> None:
        for i in range(40):
            payload = {"caller": k, "i": i, "blob": "z" * (k * 7 + i)}
            got = bridge.execute("echo", "echo", payload)
            if got != payload:
                errors_seen.append(f"{k}/{i}: {got!r}")

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors_seen == []
    stats = bridge.statistics()["pools"]["echo"]
    assert stats["requests"] >= 12 * 40
    # both workers took part
    assert all(w["requests"] > 0 for w in stats["workers"])


def test_async_gather_no_misrouting() -> None:
    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg(pool_size=3))) as b:
            results = await asyncio.gather(
                *(b.execute("echo", "echo", {"i": i}) for i in range(300))
            )
            assert [r["i"] for r in results] == list(range(300))
            # sleeping calls overlap across the 3 workers: 3 x 0.3 s in well under 0.9 s
            t0 = time.monotonic()
            pids = await asyncio.gather(
                *(b.execute("echo", "sleep", {"seconds": 0.3}) for _ in range(3))
            )
            assert time.monotonic() - t0 < 0.85
            assert len({p["pid"] for p in pids}) == 3

    asyncio.run(main())


_STREAK_CHILD = """
import asyncio, os, sys, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU: replies wait at once
sys.path.insert(0, sys.argv[1])
from host_helpers import config, echo_cfg
from mlbridge._api import AsyncMLBridge

async def main():
    async with AsyncMLBridge(config(echo_cfg())) as b:
        await b.execute("echo", "echo", {})
        ticks, stop = 0, False

        async def ticker():
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        loop = asyncio.get_running_loop()
        timer = loop.create_future()
        loop.call_later(0.02, timer.set_result, True)
        seen = []
        t0 = time.monotonic()
        while len(seen) < 400 or (not timer.done() and time.monotonic() - t0 < 10):
            await b.execute("echo", "echo", {"i": len(seen)})
            seen.append(ticks)
        stop = True
        await task
        longest = run = 0
        for before, after in zip(seen, seen[1:]):
            run = run + 1 if after == before else 0
            longest = max(longest, run)
        print(timer.done(), longest)

asyncio.run(main())
"""


def test_a_loop_of_quick_calls_still_lets_other_tasks_run() -> None:
    """A reply read at once ends a call without a loop iteration (on one CPU the worker has
    usually answered by then); at most MAX_STREAK calls in a row may end so, then one awaits
    its reply: other tasks and timers still run while a caller loops over calls."""
    from mlbridge._host.calls import MAX_STREAK

    tests_dir = str(Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", _STREAK_CHILD, tests_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    timer_fired, longest = out.stdout.split()
    assert timer_fired == "True"
    assert int(longest) <= MAX_STREAK, (longest, MAX_STREAK)


def test_overflow_grows_under_load_and_shrinks_when_idle() -> None:
    with MLBridge(config(echo_cfg(pool_size=1, overflow=2, idle_timeout=0.5))) as b:
        b.execute("echo", "ping")
        threads = [
            threading.Thread(target=b.execute, args=("echo", "sleep", {"seconds": 1.0}))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(b.statistics()["pools"]["echo"]["workers"]) == 3, 15)
        workers = b.statistics()["pools"]["echo"]["workers"]
        assert sum(w["overflow"] for w in workers) == 2
        for t in threads:
            t.join(30)
        # overflow workers retire after idle_timeout; the core worker stays
        assert wait_until(lambda: len(b.statistics()["pools"]["echo"]["workers"]) == 1, 15)
        assert not b.statistics()["pools"]["echo"]["workers"][0]["overflow"]
        assert b.execute("echo", "echo", {"ok": 1}) == {"ok": 1}


def test_overflow_never_exceeds_capacity() -> None:
    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg(pool_size=1, overflow=1))) as b:
            await asyncio.gather(
                *(b.execute("echo", "sleep", {"seconds": 0.05}) for _ in range(40))
            )
            assert len(b.statistics()["pools"]["echo"]["workers"]) <= 2

    asyncio.run(main())


def test_checkout_timeout_when_saturated() -> None:
    with MLBridge(config(echo_cfg(pool_size=1, checkout_timeout=0.3))) as b:
        b.execute("echo", "ping")
        t = threading.Thread(target=b.execute, args=("echo", "sleep", {"seconds": 1.5}))
        t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(errors.CheckoutTimeoutError, match="no free worker") as info:
            b.execute("echo", "echo", {})
        assert 0.25 <= time.monotonic() - t0 < 1.2
        assert isinstance(info.value, TimeoutError)
        assert "pool_size" in str(info.value)
        t.join(10)
        assert b.execute("echo", "echo", {"after": True}) == {"after": True}


def test_stream_sync_and_async(bridge: MLBridge) -> None:
    chunks = list(bridge.stream("echo", "stream", {"n": 4}))
    assert chunks == [{"index": i} for i in range(4)]

    async def main() -> list[object]:
        async with AsyncMLBridge(config(echo_cfg())) as b:
            return [c async for c in b.stream("echo", "stream", {"n": 3, "delay": 0.01})]

    assert asyncio.run(main()) == [{"index": i} for i in range(3)]


def test_breaking_out_of_a_stream_cancels_it_in_the_worker(bridge: MLBridge) -> None:
    it = bridge.stream("echo", "stream", {"n": 1000, "delay": 0.01})
    first = next(it)
    assert first == {"index": 0}
    t0 = time.monotonic()
    it.close()  # consumer stops early
    assert time.monotonic() - t0 < 2.0
    # the worker is free again and answers normally
    assert bridge.execute("echo", "echo", {"x": 1}) == {"x": 1}


def test_unknown_framework_and_command_errors(bridge: MLBridge) -> None:
    with pytest.raises(errors.FrameworkNotFoundError, match="no bridge named 'nope'"):
        bridge.execute("nope", "ping")
    with pytest.raises(errors.UnknownCommandError, match="unknown command 'frobnicate'"):
        bridge.execute("echo", "frobnicate")


def test_error_translation_keeps_type_and_traceback(bridge: MLBridge) -> None:
    with pytest.raises(errors.RateLimitError) as info:
        bridge.execute("echo", "fail", {"type": "RateLimitError", "message": "slow down"})
    exc = info.value
    assert "slow down" in str(exc)
    assert exc.remote_type == "RateLimitError"
    assert exc.remote_traceback and "RateLimitError" in exc.remote_traceback
    assert isinstance(exc.__cause__, errors.RemoteTraceback)
    with pytest.raises(errors.RemoteError) as info2:
        bridge.execute("echo", "fail", {"type": "KeyError", "message": "k"})
    assert info2.value.remote_type == "KeyError"
    with pytest.raises(errors.InvalidConfigurationError):
        bridge.execute("echo", "fail", {"type": "AuthenticationError", "message": "bad key"})


def test_closed_bridge_refuses_calls() -> None:
    b = MLBridge(config(echo_cfg()))
    b.execute("echo", "ping")
    pid = b.statistics()["pools"]["echo"]["workers"][0]["pid"]
    b.close()
    assert wait_until(lambda: not pid_alive(pid), 5)
    with pytest.raises(errors.BridgeUnavailableError, match="closed"):
        b.execute("echo", "ping")
    b.close()  # idempotent


def test_backend_option_is_validated_and_local_runs_workers() -> None:
    from mlbridge import bridge_config

    with pytest.raises(errors.ConfigError, match="backend") as info:
        bridge_config("x", python_module="echo", backend="kubernetes")
    assert "local" in str(info.value)
    cfg = bridge_config("x", python_module="echo", backend="local")
    assert cfg.options.backend == "local"
    with MLBridge(config(cfg)) as b:
        assert b.execute("x", "echo", {"via": "local"}) == {"via": "local"}


def test_framework_failures_are_translated_to_common_kinds(bridge: MLBridge) -> None:
    cases = {
        "RateLimitError": ("rate_limit", errors.RateLimitError),
        "APITimeoutError": ("timeout", errors.CallTimeoutError),
        "AuthenticationError": ("invalid_configuration", errors.InvalidConfigurationError),
        "OutOfMemoryError": ("model_error", errors.ModelError),
        "KeyError": ("unknown", errors.RemoteError),
    }
    for remote_type, (kind, cls) in cases.items():
        with pytest.raises(cls) as info:
            bridge.execute("echo", "fail", {"type": remote_type, "message": "m"})
        assert info.value.kind == kind, remote_type
        assert info.value.remote_type == remote_type
        assert kind in errors.KINDS
    with pytest.raises(errors.WorkerCrashedError) as crash:
        bridge.execute("echo", "crash", {"mode": "exit", "code": 9})
    assert crash.value.kind == "worker_crashed"
