"""Host-owned resources, sessions, call-backs and telemetry, through real echo workers."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from host_helpers import config, echo_cfg, pid_alive, wait_until
from mlbridge import errors
from mlbridge._api import AsyncMLBridge, MLBridge
from mlbridge._host.telemetry import HealthEvent, RequestEvent


def _worker_copies(b: MLBridge, rid: str) -> int:
    """How many live workers hold a copy of ``rid`` (asked of each worker directly)."""
    pool = b._host.pools["echo"]

    async def ask() -> int:
        n = 0
        for w in list(pool.workers):
            res = await w.channel.request("list_resources", {}, timeout=5)
            n += any(r["resource_id"] == rid for r in res["resources"])
        return n

    return b._call(ask())


def test_resource_rebuilt_on_any_worker_and_state_survives() -> None:
    with MLBridge(config(echo_cfg(pool_size=2))) as b:
        rid = b.create_resource("echo", "counter", {"start": 5, "step": 2})
        seen_pids = set()
        values = []
        for _ in range(6):
            # force spreading: occupy whichever worker holds it now and then
            out = b.execute_resource("echo", rid, {})
            values.append(out["value"])
            seen_pids.add(out["pid"])
        assert values == [7, 9, 11, 13, 15, 17]
        listed = b.list_resources("echo")
        assert [r["resource_id"] for r in listed] == [rid]
        assert listed[0]["type"] == "counter" and listed[0]["config"] == {"start": 5, "step": 2}
        assert listed[0]["has_state"] is True

        # kill whichever worker served last: the next call rebuilds from the saved state
        last_pid = out["pid"]
        os.kill(last_pid, signal.SIGKILL)
        assert wait_until(
            lambda: (
                last_pid not in [w["pid"] for w in b.statistics()["pools"]["echo"]["workers"]]
                and len(b.statistics()["pools"]["echo"]["workers"]) == 2
            ),
            10,
        )
        assert b.execute_resource("echo", rid, {})["value"] == 19


def test_calls_spread_across_workers_each_rebuilding_the_resource() -> None:
    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg(pool_size=3))) as b:
            rid = await b.create_resource("echo", "prefixer", {"prefix": "p:"})
            outs = await asyncio.gather(
                *(b.execute_resource("echo", rid, {"text": str(i)}) for i in range(30))
            )
            assert [o["text"] for o in outs] == [f"p:{i}" for i in range(30)]
            holders = sum(1 for w in b._host.pools["echo"].workers if rid in w.resources)
            assert holders >= 2  # load spread over several workers, each built its copy

    asyncio.run(main())


def test_delete_removes_every_copy() -> None:
    with MLBridge(config(echo_cfg(pool_size=2))) as b:
        rid = b.create_resource("echo", "prefixer", {"prefix": "x"})

        async def spread() -> None:
            await asyncio.gather(
                *(b._host.execute_resource("echo", rid, {"text": "a"}) for _ in range(10))
            )

        b._call(spread())
        assert _worker_copies(b, rid) >= 1
        out = b.delete_resource("echo", rid)
        assert out["status"] == "deleted"
        assert _worker_copies(b, rid) == 0
        assert b.list_resources("echo") == []
        with pytest.raises(errors.ResourceNotFoundError, match="create_resource"):
            b.execute_resource("echo", rid, {})
        with pytest.raises(errors.ResourceNotFoundError):
            b.delete_resource("echo", rid)


def test_resource_errors() -> None:
    with MLBridge(config(echo_cfg())) as b:
        with pytest.raises(errors.UnknownCommandError, match="create_nonsense"):
            b.create_resource("echo", "nonsense", {})
        assert b.list_resources("echo") == []  # a failed create records nothing
        rid = b.create_resource("echo", "counter", {}, resource_id="mine")
        assert rid == "mine"
        with pytest.raises(errors.InvalidRequestError, match="already exists"):
            b.create_resource("echo", "counter", {}, resource_id="mine")


def test_session_affinity_and_survival() -> None:
    with MLBridge(config(echo_cfg(pool_size=3))) as b:
        with b.session("echo") as s:
            rid = s.create_resource("counter", {"start": 0})
            pids = {s.execute_resource(rid, {})["pid"] for _ in range(8)}
            assert len(pids) == 1  # affinity: one worker serves the session
            assert s.execute("session") == s.id  # the worker sees the session id
            (pid,) = pids
            os.kill(pid, signal.SIGKILL)
            assert wait_until(
                lambda: pid not in [w["pid"] for w in b.statistics()["pools"]["echo"]["workers"]],
                10,
            )
            out = s.execute_resource(rid, {})
            assert out["value"] == 9 and out["pid"] != pid  # survived, on a new worker
            assert [r["resource_id"] for r in s.list_resources()] == [rid]
        # closing the session deletes its resources
        assert b.list_resources("echo") == []


def test_session_ttl_expires_resources() -> None:
    with MLBridge(config(echo_cfg())) as b:
        s = b.session("echo", ttl=0.5)
        s.create_resource("counter", {})
        assert len(b.list_resources("echo")) == 1
        assert wait_until(lambda: b.list_resources("echo") == [], 5)


def test_callback_to_another_bridge_and_streamed() -> None:
    cfg = config(echo_cfg("a", pool_size=1), echo_cfg("b", pool_size=1))
    with MLBridge(cfg) as b:
        out = b.execute("a", "call_host", {"bridge": "b", "command": "pid"})
        a_pid = b.execute("a", "pid")
        assert isinstance(out, int) and out != a_pid
        streamed = b.execute(
            "a", "stream_host", {"bridge": "b", "command": "stream", "args": {"n": 3}}
        )
        assert streamed == [{"index": 0}, {"index": 1}, {"index": 2}]
        chunks = list(
            b.stream("a", "stream_host", {"bridge": "b", "command": "stream", "args": {"n": 2}})
        )
        assert chunks == [{"index": 0}, {"index": 1}]
        # a failure in the target comes back as the outer call's failure, keeping its code
        with pytest.raises(errors.UnknownCommandError, match="b:nope: unknown command") as info:
            b.execute("a", "call_host", {"bridge": "b", "command": "nope"})
        assert info.value.remote_traceback and "Remote traceback" in info.value.remote_traceback
        # a call back to a bridge that does not exist names it
        with pytest.raises(errors.FrameworkNotFoundError, match="no bridge named 'zzz'"):
            b.execute("a", "call_host", {"bridge": "zzz", "command": "ping"})


def test_callback_carries_the_callers_session() -> None:
    cfg = config(echo_cfg("a"), echo_cfg("b"))
    with MLBridge(cfg) as b, b.session("a") as s:
        got = s.execute("call_host", {"bridge": "b", "command": "session"})
        assert got == s.id


def test_self_call_that_would_deadlock_fails_clearly() -> None:
    with MLBridge(config(echo_cfg(pool_size=1))) as b:
        t0 = time.monotonic()
        with pytest.raises(errors.CallbackError, match="deadlock avoided"):
            b.execute("echo", "call_host", {"bridge": "echo", "command": "echo"})
        assert time.monotonic() - t0 < 5
        # with room to grow, the same call works
    with MLBridge(config(echo_cfg(pool_size=1, overflow=1))) as b:
        assert b.execute(
            "echo", "call_host", {"bridge": "echo", "command": "echo", "args": {"k": 1}}
        ) == {"k": 1}


def test_telemetry_hooks_stats_and_prometheus() -> None:
    events: list[object] = []
    with MLBridge(config(echo_cfg(pool_size=1, health_check_interval=0.2))) as b:
        remove = b.add_hook(events.append)
        b.execute("echo", "echo", {})
        with pytest.raises(errors.RemoteError):
            b.execute("echo", "fail", {"type": "KeyError"})
        # a direct call's event is queued from the caller thread and delivered by the loop
        # at its next emit or drain (within a second), so a health event can come first
        assert wait_until(
            lambda: (
                any(isinstance(e, HealthEvent) for e in events)
                and sum(isinstance(e, RequestEvent) for e in events) >= 2
            ),
            5,
        )
        reqs = [e for e in events if isinstance(e, RequestEvent)]
        assert [(e.command, e.success) for e in reqs[:2]] == [("echo", True), ("fail", False)]
        assert reqs[1].error_code == "unknown" and reqs[0].duration_s > 0
        health = next(e for e in events if isinstance(e, HealthEvent))
        assert health.rss_bytes > 1_000_000
        stats = b.get_stats("echo")
        assert stats["requests"] >= 2 and stats["errors"] >= 1
        w = stats["workers"][0]
        assert w["pid"] > 0 and w["rss_bytes"] > 0 and w["uptime"] > 0
        text = b.prometheus()
        # prometheus-client writes labels in name order and values as floats
        assert 'mlbridge_requests_total{command="echo",framework="echo",success="true"} 1.0' in text
        assert "mlbridge_worker_rss_bytes" in text
        remove()
        n = len(events)
        b.execute("echo", "echo", {})
        time.sleep(0.1)
        assert not any(isinstance(e, RequestEvent) for e in events[n:])


def test_start_bridge_at_runtime_with_script(tmp_path: object) -> None:
    import pathlib

    script = pathlib.Path(str(tmp_path)) / "greeter.py"
    script.write_text(
        "from mlbridge.bridges.base import BaseBridge\n"
        "class Greeter(BaseBridge):\n"
        "    name = 'greeter'\n"
        "    def _register_handlers(self):\n"
        "        self.register_handler('greet', lambda a: 'hello ' + a['who'])\n"
    )
    with MLBridge(config(echo_cfg())) as b:
        cfg = b.start_bridge("greeter", python_script=str(script), pool_size=2)
        assert cfg.pool_size == 2
        assert b.execute("greeter", "greet", {"who": "ada"}) == "hello ada"
        assert "greeter" in b.list_frameworks()
        assert len(b.statistics()["pools"]["greeter"]["workers"]) == 2
        # pools are isolated: killing greeter's workers leaves echo alone
        echo_pid = b.execute("echo", "pid")
        killed = {w["pid"] for w in b.statistics()["pools"]["greeter"]["workers"]}
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not any(pid_alive(p) for p in killed), 5)
        assert b.execute("echo", "pid") == echo_pid
        # a call right after is not lost: it cannot reach the dead workers (maybe not yet
        # noticed by the host), so it fails as undelivered and runs on a new one
        assert b.execute("greeter", "greet", {"who": "bob"}) == "hello bob"

        def replaced() -> bool:
            pids = {w["pid"] for w in b.statistics()["pools"]["greeter"]["workers"]}
            return len(pids) == 2 and not pids & killed

        assert wait_until(replaced, 10)


def test_update_config_resizes_pool_and_keeps_resources() -> None:
    with MLBridge(config(echo_cfg(pool_size=1))) as b:
        rid = b.create_resource("echo", "counter", {"start": 1})
        b.execute_resource("echo", rid, {})
        b.update_config("echo", pool_size=3, settings={"tag": "v2"})
        assert b.execute("echo", "settings") == {"tag": "v2"}
        assert len(b.statistics()["pools"]["echo"]["workers"]) == 3
        assert b.execute_resource("echo", rid, {})["value"] == 3


def test_start_bridge_validates_environment_before_registering(tmp_path: object) -> None:
    with MLBridge(config(echo_cfg())) as b:
        with pytest.raises(errors.EnvironmentCheckError) as info:
            b.start_bridge(
                "needy",
                python_module="echo",
                required_packages=["surely_not_installed_pkg"],
                required_env=["MLBRIDGE_TEST_SURELY_UNSET"],
            )
        text = str(info.value)
        assert "surely_not_installed_pkg" in text and "MLBRIDGE_TEST_SURELY_UNSET" in text
        assert "Fix:" in text
        assert "needy" not in b.list_frameworks()  # nothing half-registered
        # replacing a good bridge with a broken config leaves the good one running
        pid = b.execute("echo", "pid")
        with pytest.raises(errors.EnvironmentCheckError):
            b.start_bridge(
                "echo", python_module="echo", required_env=["MLBRIDGE_TEST_SURELY_UNSET"]
            )
        assert b.execute("echo", "pid") == pid
        problems = b.validate_environment("echo")
        assert problems == []


def test_session_ttl_counts_from_the_last_use_of_any_kind() -> None:
    with MLBridge(config(echo_cfg())) as b:
        s = b.session("echo", ttl=1.0)
        rid = s.create_resource("counter", {})
        for _ in range(6):  # 2.4 s of use through execute_resource alone, never idle 1 s
            time.sleep(0.4)
            s.execute_resource(rid, {})
        assert [r["resource_id"] for r in b.list_resources("echo")] == [rid]
        assert wait_until(lambda: b.list_resources("echo") == [], 5)  # idle: it expires


def test_a_state_patch_changes_only_the_parts_it_names() -> None:
    from mlbridge._host.resources import apply_patch

    saved = {"history": {"a": [1], "b": [2]}, "other": 3}
    patched = apply_patch(
        saved,
        [
            [["history", "b"], [2, 4]],
            [["history", "c"], [5]],
            [["other"], None],  # None removes
            [["new", "deep", "key"], "v"],  # missing objects on the way are made
            ["not-a-path", 1],  # malformed entries are skipped
            [[], 1],
        ],
    )
    assert patched == {"history": {"a": [1], "b": [2, 4], "c": [5]}, "new": {"deep": {"key": "v"}}}
    assert saved == {"history": {"a": [1], "b": [2]}, "other": 3}  # the old record is not touched
    assert apply_patch(None, [[["x"], 1]]) == {"x": 1}
