"""Supervision through real processes: kill -9, hangs, timeouts, crash loops, recycling, orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from host_helpers import config, echo_cfg, pid_alive, wait_until
from mlbridge import errors
from mlbridge._api import AsyncMLBridge, MLBridge
from mlbridge._host.telemetry import WorkerEvent


def _pids(b: MLBridge, name: str = "echo") -> list[int]:
    return [w["pid"] for w in b.statistics()["pools"][name]["workers"]]


def test_kill_9_mid_load_only_that_call_fails_and_pool_recovers() -> None:
    with MLBridge(config(echo_cfg(pool_size=3))) as b:
        b.execute("echo", "ping")
        rid = b.create_resource("echo", "counter", {"start": 100})
        with b.session("echo") as s:
            sres = s.create_resource("prefixer", {"prefix": ">> "})
            victim_pid: int = b.execute("echo", "sleep", {"seconds": 0})["pid"]
            outcomes: dict[str, Any] = {}

            def long_call(tag: str, seconds: float) -> None:
                try:
                    outcomes[tag] = b.execute("echo", "sleep", {"seconds": seconds})
                except Exception as exc:
                    outcomes[tag] = exc

            threads = [threading.Thread(target=long_call, args=(f"c{i}", 1.5)) for i in range(3)]
            for t in threads:
                t.start()
            assert wait_until(
                lambda: all(w["busy"] for w in b.statistics()["pools"]["echo"]["workers"]), 5
            )
            os.kill(victim_pid, signal.SIGKILL)
            for t in threads:
                t.join(20)
            failed = [v for v in outcomes.values() if isinstance(v, Exception)]
            ok = [v for v in outcomes.values() if not isinstance(v, Exception)]
            assert len(failed) == 1 and len(ok) == 2, outcomes
            crash = failed[0]
            assert isinstance(crash, errors.WorkerCrashedError)
            assert "SIGKILL" in str(crash) and "exit -9" in str(crash)
            assert crash.details["exit_code"] == -9
            # the pool returns to full size with a fresh worker
            assert wait_until(lambda: len(_pids(b)) == 3, 15)
            assert victim_pid not in _pids(b)
            # resources and sessions still work afterwards
            assert b.execute_resource("echo", rid, {"by": 1})["value"] == 101
            assert s.execute_resource(sres, {"text": "hi"}) == {"text": ">> hi"}


def test_hang_times_out_at_deadline_and_worker_is_replaced() -> None:
    with MLBridge(config(echo_cfg(pool_size=1, cancel_grace=0.3))) as b:
        old = b.execute("echo", "pid")
        t0 = time.monotonic()
        with pytest.raises(errors.CallTimeoutError, match="timeout") as info:
            b.execute("echo", "busy", {"seconds": 30}, timeout=0.5)
        elapsed = time.monotonic() - t0
        assert 0.5 <= elapsed < 2.5, elapsed
        assert isinstance(info.value, TimeoutError)
        assert wait_until(lambda: not pid_alive(old), 5)
        new = b.execute("echo", "pid", timeout=10)
        assert new != old


def test_async_timeouts_fire_at_their_own_deadlines_whatever_came_before() -> None:
    """A channel's calls share one deadline timer: a later call with a shorter timeout still
    times out on time, and one with a longer timeout is not cut short by an earlier call's."""

    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg(pool_size=1)), env_overrides=False) as b:
            pid = await b.execute("echo", "pid", timeout=60)  # arms the timer 60 s out
            for timeout in (0.4, 1.2):  # shorter than what is armed, then longer than 0.4
                t0 = time.monotonic()
                with pytest.raises(errors.CallTimeoutError, match=f"{timeout:g}s timeout"):
                    await b.execute("echo", "sleep", {"seconds": 30}, timeout=timeout)
                elapsed = time.monotonic() - t0
                assert timeout <= elapsed < timeout + 2.0, (timeout, elapsed)
            quick = await b.execute("echo", "echo", {"x": 1}, timeout=0.3)
            await asyncio.sleep(0.5)  # its deadline passes after it answered: nothing fails
            assert quick == {"x": 1}
            assert await b.execute("echo", "pid", timeout=5) == pid  # cancelled, kept

    asyncio.run(main())


def test_cancellable_call_times_out_without_killing_the_worker() -> None:
    with MLBridge(config(echo_cfg(pool_size=1))) as b:
        old = b.execute("echo", "pid")
        with pytest.raises(errors.CallTimeoutError):
            b.execute("echo", "sleep", {"seconds": 30}, timeout=0.4)
        # the worker honoured the cancel, so it was kept
        assert b.execute("echo", "pid") == old


def test_worker_that_misses_heartbeats_is_killed_and_replaced(tmp_path: Path) -> None:
    # A bridge whose control thread is blocked cannot answer heartbeats: simulate by SIGSTOP.
    events: list[WorkerEvent] = []
    cfg = echo_cfg(pool_size=1, health_check_interval=0.2, heartbeat_timeout=0.5)
    with MLBridge(config(cfg)) as b:
        b.add_hook(lambda e: events.append(e) if isinstance(e, WorkerEvent) else None)
        old = b.execute("echo", "pid")
        os.kill(old, signal.SIGSTOP)
        try:
            assert wait_until(lambda: old not in _pids(b) and len(_pids(b)) == 1, 15)
        finally:
            if pid_alive(old):
                os.kill(old, signal.SIGCONT)
        assert b.execute("echo", "pid") != old
        assert any(e.event == "exited" and "heartbeat" in (e.reason or "") for e in events)


def test_crash_looping_bridge_is_marked_broken_with_boot_error() -> None:
    cfg = echo_cfg(pool_size=2, settings={"fail_boot": "no GPU today"}, max_boot_failures=3)
    with MLBridge(config(cfg)) as b:
        t0 = time.monotonic()
        with pytest.raises(errors.BridgeBrokenError, match="no GPU today") as info:
            b.execute("echo", "ping")
        assert time.monotonic() - t0 < 30
        assert "doctor" in str(info.value)
        stats = b.statistics()["pools"]["echo"]
        assert stats["state"] == "broken" and "no GPU today" in stats["boot_error"]
        # later calls fail fast with the same error instead of restarting forever
        t0 = time.monotonic()
        with pytest.raises(errors.BridgeBrokenError):
            b.execute("echo", "ping")
        assert time.monotonic() - t0 < 0.5


def test_unimportable_bridge_module_fails_before_spawning() -> None:
    cfg = echo_cfg(name="ghost", module="no_such_pkg.bridge:Ghost")
    with MLBridge(config(cfg)) as b:
        with pytest.raises(errors.EnvironmentCheckError, match="no_such_pkg") as info:
            b.execute("ghost", "ping")
        assert isinstance(info.value, errors.ConfigError)
        assert b.statistics()["pools"]["ghost"]["workers"] == []


def test_bridge_that_fails_to_import_at_boot_is_broken(tmp_path: Path) -> None:
    # Importable as a file, but its import raises inside the worker: a boot failure.
    script = tmp_path / "exploding.py"
    script.write_text("raise RuntimeError('exploding bridge module')\n")
    cfg = echo_cfg(name="boom", module="echo", max_boot_failures=2)
    with MLBridge(config(cfg)) as b:
        b.update_config("boom", python_script=str(script))
        with pytest.raises(errors.BridgeBrokenError, match="exploding bridge module"):
            b.execute("boom", "ping")


def test_broken_bridge_can_be_fixed_with_update_config() -> None:
    cfg = echo_cfg(pool_size=1, settings={"fail_boot": "bad"}, max_boot_failures=2)
    with MLBridge(config(cfg)) as b:
        with pytest.raises(errors.BridgeBrokenError):
            b.execute("echo", "ping")
        b.update_config("echo", settings={})
        assert b.execute("echo", "echo", {"fixed": True}) == {"fixed": True}


def test_max_requests_recycles_worker() -> None:
    with MLBridge(config(echo_cfg(pool_size=1, max_requests=3))) as b:
        pids = [b.execute("echo", "pid") for _ in range(7)]
        assert pids[0] == pids[1] == pids[2]
        assert pids[3] != pids[2]
        assert len(set(pids)) == 3


def test_max_memory_is_hard_the_call_fails_naming_it_and_the_worker_is_replaced() -> None:
    # max_memory is enforced by the OS (issue 16): over it, the call fails with the limit named
    # (the kernel stops the worker, or the allocation fails under RLIMIT_AS), then a new worker
    cfg = echo_cfg(pool_size=1, max_memory=300 * 1000 * 1000, health_check_interval=0.2)
    events: list[WorkerEvent] = []
    with MLBridge(config(cfg)) as b:
        b.add_hook(lambda e: events.append(e) if isinstance(e, WorkerEvent) else None)
        old = b.execute("echo", "pid")
        with pytest.raises(errors.ResourceLimitError) as caught:
            b.execute("echo", "allocate", {"mb": 400})
        assert "max_memory=300MB" in str(caught.value)
        assert wait_until(lambda: old not in _pids(b) and len(_pids(b)) == 1, 15)
        assert b.execute("echo", "pid") != old


HOST_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from mlbridge._api import MLBridge
    from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig
    cfg = MLBridgeConfig(bridges={"echo": BridgeConfig("echo", python_module="echo", pool_size=3)})
    b = MLBridge(cfg)
    b.execute("echo", "ping")
    pids = [w["pid"] for w in b.statistics()["pools"]["echo"]["workers"]]
    print(json.dumps(pids), flush=True)
    time.sleep(600)
    """
)


def test_host_killed_with_sigkill_leaves_no_worker(tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    env = {**os.environ, "MLBRIDGE_RUNTIME_DIR": str(tmp_path / "rt")}
    host = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert host.stdout is not None
        pids = json.loads(host.stdout.readline())
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
        host.send_signal(signal.SIGKILL)
        host.wait(10)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 5), [
            p for p in pids if pid_alive(p)
        ]
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()


def test_reaper_leaves_workers_of_a_live_host_alone(tmp_path: Path) -> None:
    from mlbridge._host.reaper import PidRegistry

    reg = PidRegistry(tmp_path)
    live = subprocess.Popen(
        [sys.executable, "-m", "mlbridge.worker", "echo"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        reg.register(live.pid)  # recorded by this (live) host
        assert PidRegistry(tmp_path).reap() == []
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()
