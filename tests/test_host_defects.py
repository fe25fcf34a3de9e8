"""Defects of the earlier host core, each provoked through real workers (issue "Host core")."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time

import pytest

from host_helpers import config, echo_cfg, pid_alive, wait_until
from mlbridge import errors
from mlbridge._api import AsyncMLBridge, MLBridge


def _pids(b: MLBridge, name: str = "echo") -> list[int]:
    return [w["pid"] for w in b.statistics()["pools"][name]["workers"]]


# -- 0: a call the caller gives up on keeps its worker until it stops -----------------------
def test_cancelled_call_does_not_hand_its_busy_worker_to_the_next_caller() -> None:
    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg(pool_size=1, cancel_grace=0.5))) as b:
            await b.execute("echo", "echo", {})  # the pool starts on first use
            first = b.statistics()
            pid0 = first.pools["echo"].workers[0].pid
            with pytest.raises(TimeoutError):
                # "busy" ignores cancellation: the worker must be killed, not reused
                await asyncio.wait_for(b.execute("echo", "busy", {"seconds": 10}), 0.5)
            t0 = time.monotonic()
            assert await b.execute("echo", "echo", {"next": 1}, timeout=5) == {"next": 1}
            assert time.monotonic() - t0 < 5
            assert b.statistics().pools["echo"].workers[0].pid != pid0

            # "sleep" honours cancel: the same worker answers it and serves the next call
            pid1 = b.statistics().pools["echo"].workers[0].pid
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(b.execute("echo", "sleep", {"seconds": 10}), 0.3)
            assert await b.execute("echo", "pid", timeout=5) == pid1

    asyncio.run(main())


def test_ctrl_c_in_a_blocking_call_does_not_hand_the_busy_worker_out() -> None:
    with MLBridge(config(echo_cfg(pool_size=1, cancel_grace=0.5))) as b:
        pid0 = b.execute("echo", "pid")
        timer = threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            b.execute("echo", "busy", {"seconds": 10})
        timer.join()
        t0 = time.monotonic()
        assert b.execute("echo", "echo", {"after": 1}, timeout=5) == {"after": 1}
        assert time.monotonic() - t0 < 5
        assert b.execute("echo", "pid") != pid0  # the busy one was killed and replaced


def test_callback_withdrawn_by_a_timeout_does_not_leave_its_worker_double_booked() -> None:
    a = echo_cfg("a", pool_size=1, cancel_grace=0.5)
    b_ = echo_cfg("b", pool_size=1, cancel_grace=0.5)
    with MLBridge(config(a, b_)) as b:
        with pytest.raises(errors.MLBridgeError):
            b.execute(
                "a",
                "call_host",
                {"bridge": "b", "command": "busy", "args": {"seconds": 10}, "timeout": 0.4},
                timeout=5,
            )
        assert b.execute("b", "echo", {"ok": 1}, timeout=5) == {"ok": 1}


# -- 1: calls that never reached a dead worker wait for a live one --------------------------
def test_calls_to_workers_killed_while_idle_all_run_sync() -> None:
    with MLBridge(config(echo_cfg(pool_size=2, health_check_interval=30))) as b:
        b.execute("echo", "echo", {})
        victims = _pids(b)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not any(pid_alive(p) for p in victims), 5)
        results = [b.execute("echo", "echo", {"i": i}, timeout=20) for i in range(10)]
        assert results == [{"i": i} for i in range(10)]


def test_calls_to_workers_killed_while_idle_all_run_async() -> None:
    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg(pool_size=2, health_check_interval=30))) as b:
            await b.execute("echo", "echo", {})
            victims = [w.pid for w in b.statistics().pools["echo"].workers]
            for pid in victims:
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if not any(pid_alive(p or 0) for p in victims):
                    break
                await asyncio.sleep(0.02)
            results = await asyncio.gather(
                *(b.execute("echo", "echo", {"i": i}, timeout=20) for i in range(10))
            )
            assert results == [{"i": i} for i in range(10)]

    asyncio.run(main())


# -- 3: call-backs do not move the caller's session to another framework's worker ----------
def test_callback_keeps_the_sessions_affinity_on_its_own_framework() -> None:
    a = echo_cfg("a", pool_size=2)
    b_ = echo_cfg("b", pool_size=2)
    with MLBridge(config(a, b_)) as b:
        with b.session("a") as s:
            first = s.execute("pid")
            home = s.worker_id
            assert home is not None and home.startswith("a-")
            for _ in range(4):
                s.execute("call_host", {"bridge": "b", "command": "pid"})
                assert s.worker_id == home
            assert s.execute("pid") == first


# -- 4: create_resource keeps its session alive ----------------------------------------------
def test_create_resource_refreshes_the_session_ttl() -> None:
    with MLBridge(config(echo_cfg(pool_size=1))) as b:
        s = b.session("echo", ttl=1.5)
        rids = []
        for _ in range(6):  # 3 s of activity made only of create_resource
            rids.append(s.create_resource("counter", {"start": 0}))
            time.sleep(0.5)
        listed = {r["resource_id"] for r in b.list_resources("echo")}
        assert set(rids) <= listed  # nothing expired
        assert s.execute("echo", {"alive": True}) == {"alive": True}
        s.close()


# -- 5: honest statistics, as a frozen snapshot ------------------------------------------------
def test_statistics_count_every_replaced_worker_and_know_rss_at_once() -> None:
    with MLBridge(config(echo_cfg(pool_size=2, health_check_interval=30))) as b:
        b.execute("echo", "echo", {})  # the pool starts on first use
        stats = b.statistics()
        pool = stats.pools["echo"]
        assert all(w.rss_bytes > 1_000_000 for w in pool.workers)  # before any health check
        with pytest.raises(dataclasses.FrozenInstanceError):
            pool.restarts = 5  # type: ignore[misc]
        assert not isinstance(stats, dict)
        assert stats["pools"]["echo"]["restarts"] == 0  # the dict view still reads
        for pid in _pids(b):
            os.kill(pid, signal.SIGKILL)
        assert wait_until(
            lambda: len(_pids(b)) == 2 and not set(_pids(b)) & {w.pid for w in pool.workers}, 15
        )
        assert b.statistics().pools["echo"].restarts == 2
        b.update_config("echo", max_requests=1)  # recycling is not a restart
        b.execute("echo", "echo", {})
        b.execute("echo", "echo", {})
        assert b.statistics().pools["echo"].restarts == 0  # a new pool


# -- issue 9 item 7: timeouts are validated at the API boundary -------------------------------
@pytest.mark.parametrize("bad", [-1, 0, "5", float("nan"), float("inf"), True])
def test_bad_timeouts_are_refused_clearly_on_both_apis(bad: object) -> None:
    with MLBridge(config(echo_cfg())) as b:
        with pytest.raises(errors.InvalidArgumentError, match="timeout") as info:
            b.execute("echo", "echo", {}, timeout=bad)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError)
        assert "seconds" in str(info.value)
        with pytest.raises(errors.InvalidArgumentError):
            b.create_resource("echo", "counter", {}, timeout=bad)  # type: ignore[arg-type]
        assert b.execute("echo", "echo", {"fine": 1}, timeout=2) == {"fine": 1}

    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg())) as ab:
            with pytest.raises(errors.InvalidArgumentError, match="timeout"):
                await ab.execute("echo", "echo", {}, timeout=bad)  # type: ignore[arg-type]
            with pytest.raises(errors.InvalidArgumentError):
                ab.stream("echo", "stream", {}, timeout=bad)  # type: ignore[arg-type]

    asyncio.run(main())


# -- issue 9 item 8: close() with a call in flight says the host is closing -------------------
def test_close_with_a_call_in_flight_says_the_host_is_closing() -> None:
    b = MLBridge(config(echo_cfg(pool_size=1, shutdown_timeout=1.0)))
    box: dict[str, BaseException] = {}

    def call() -> None:
        try:
            b.execute("echo", "sleep", {"seconds": 30})
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    b.close()
    t.join(10)
    exc = box["exc"]
    assert isinstance(exc, errors.MLBridgeError)
    assert "the host is closing" in str(exc)
    assert "exited normally" not in str(exc)


def test_close_while_a_call_waits_for_its_pool_to_start_fails_that_call_at_once() -> None:
    """A blocking call waiting on a pool still booting when close() runs is failed, saying the
    host is closing, instead of hanging its caller when the loop stops."""
    b = MLBridge(config(echo_cfg(pool_size=1, settings={"boot_delay": 20})))
    box: dict[str, BaseException] = {}

    def call() -> None:
        try:
            b.execute("echo", "echo", {"x": 1})
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.5)
    b.close()
    t.join(10)
    assert not t.is_alive(), "the caller was left hanging after close()"
    assert isinstance(box["exc"], errors.MLBridgeError)
    assert "the host is closing" in str(box["exc"])


# -- issue 9 item 4: a heartbeat kill says what happened ---------------------------------------
def test_a_worker_holding_the_gil_is_killed_for_its_heartbeat_and_told_so() -> None:
    from pathlib import Path

    from mlbridge.config import BridgeConfig, BridgeOptions

    script = str(Path(__file__).parent / "bridges" / "gil_bridge.py")
    cfg = BridgeConfig(
        "gil",
        python_script=script,
        options=BridgeOptions(health_check_interval=0.3, heartbeat_timeout=1.0, timeout=60),
    )
    with MLBridge(config(cfg)) as b:
        t0 = time.monotonic()
        with pytest.raises(errors.WorkerCrashedError) as info:
            b.execute("gil", "gil", {"seconds": 20})
        assert time.monotonic() - t0 < 10
        msg = str(info.value)
        assert "missed its heartbeat (1 s) while running 'gil'" in msg
        assert "larger heartbeat_timeout" in msg
        assert "out of memory" not in msg


# -- issue 9 item 8: bytes printed to stdout before hello are shown -----------------------------
def test_stdout_garbage_before_hello_is_reported_as_such(tmp_path: object) -> None:
    from pathlib import Path

    site = Path(str(tmp_path)) / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("print('hello from sitecustomize')\n")
    from mlbridge.config import BridgeConfig, BridgeOptions

    cfg = BridgeConfig(
        "echo",
        python_module="echo",
        env={"PYTHONPATH": str(site)},
        options=BridgeOptions(max_boot_failures=2, startup_timeout=10),
    )
    with MLBridge(config(cfg)) as b:
        with pytest.raises(errors.BridgeBrokenError) as info:
            b.execute("echo", "echo", {})
    msg = str(info.value)
    assert "non-protocol bytes to its stdout before answering hello" in msg
    assert "hello from sitecustomize" in msg
    assert "out of memory" not in msg


# -- issue 9 item 3: secrets stay out of argv, reprs, logs and statistics ---------------------
def test_settings_secrets_never_reach_cmdline_repr_logs_or_statistics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    secret = "sk-test-DO-NOT-LEAK-4242"
    cfg = echo_cfg(pool_size=2, settings={"api_key": secret, "model": "m"})
    caplog.set_level(logging.DEBUG, "mlbridge")
    with MLBridge(config(cfg)) as b:
        assert b.execute("echo", "settings")["api_key"] == secret  # the worker has it
        for pid in _pids(b):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert secret.encode() not in f.read()
        assert secret not in repr(b.config) and secret not in repr(cfg)
        assert secret not in repr(b.statistics()) and secret not in str(b.statistics().to_dict())
        assert secret not in b.prometheus()
        rid = b.create_resource("echo", "counter", {"start": 1, "token": secret})
        assert secret not in str(b.list_resources("echo"))
        assert b.execute_resource("echo", rid, {})["value"] == 2  # the worker got the real config
    assert secret not in caplog.text


# -- the broken-bridge message counts what happened and gives the CLI way too --------------------
def test_broken_bridge_message_matches_the_log_and_names_both_fixes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    caplog.set_level(logging.ERROR, "mlbridge")
    cfg = echo_cfg(pool_size=1, settings={"fail_boot": "bad"}, max_boot_failures=3)
    with MLBridge(config(cfg)) as b:
        with pytest.raises(errors.BridgeBrokenError) as info:
            b.execute("echo", "ping")
    msg = str(info.value)
    assert "failed 2 boots in a row, with an error that will not fix itself" in msg
    assert "before max_boot_failures=3" in msg
    assert "start_bridge('echo'" in msg and "from the CLI" in msg
    assert "(2/3; a boot error that will not fix itself: the bridge is broken)" in caplog.text


def test_an_abandoned_call_failed_by_a_crash_is_not_reported_as_never_retrieved() -> None:
    """A caller gives up on a call (its task cancelled) that ignores the cancel, then the worker
    dies: the abandoned call's outcome is nobody's to await, and asyncio must not log it as
    "Future exception was never retrieved"."""
    import gc

    from mlbridge._api import AsyncMLBridge

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        loop.set_exception_handler(lambda _loop, ctx: seen.append(str(ctx.get("message"))))
        b = AsyncMLBridge(config(echo_cfg(pool_size=1, cancel_grace=30.0)))
        await b.start()
        try:
            pid = await b.execute("echo", "pid", {})
            task = asyncio.ensure_future(b.execute("echo", "busy", {"seconds": 30}))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            os.kill(pid, signal.SIGKILL)
            for _ in range(100):  # the pool replaces the dead worker
                await asyncio.sleep(0.1)
                if (await b.execute("echo", "pid", {})) != pid:
                    break
            del task
            gc.collect()
            await asyncio.sleep(0.1)
        finally:
            await b.close()
        return seen

    seen = asyncio.run(main())
    assert not [m for m in seen if "never retrieved" in m], seen
