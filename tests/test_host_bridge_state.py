"""Bridge-wide state, stream results and streamed resources, through real worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from host_helpers import config, echo_cfg, wait_until
from mlbridge import errors
from mlbridge._api import AsyncMLBridge, MLBridge
from mlbridge.config import BridgeConfig, BridgeOptions

SCRIPT = str(Path(__file__).parent / "bridges" / "stateful_bridge.py")


def stateful_cfg(pool_size: int = 3, overflow: int = 0) -> BridgeConfig:
    return BridgeConfig(
        "stateful",
        python_script=SCRIPT,
        pool_size=pool_size,
        overflow=overflow,
        options=BridgeOptions(health_check_interval=0.5, timeout=20.0, startup_timeout=30.0),
    )


def _states_of_every_worker(b: MLBridge) -> dict[int, dict[str, object]]:
    """Ask each live worker of the pool directly (not through the host's call path)."""
    pool = b._host.pools["stateful"]

    async def ask() -> dict[int, dict[str, object]]:
        out = {}
        for w in list(pool.workers):
            if not w.alive:
                continue
            try:
                res = await w.channel.request("state", {}, timeout=5)
            except errors.WorkerCrashedError:
                continue  # died meanwhile (the test killed it)
            out[res["pid"]] = res["state"]
        return out

    return b._call(ask())


def test_bridge_state_reaches_every_worker_replacements_and_overflow() -> None:
    with MLBridge(config(stateful_cfg(pool_size=3, overflow=1))) as b:
        out = b.execute("stateful", "configure", {"model": "m1", "temperature": 0.5})
        assert out["configured"] == ["model", "temperature"]
        expected = {"model": "m1", "temperature": 0.5}
        assert wait_until(
            lambda: list(_states_of_every_worker(b).values()) == [expected] * 3, 10
        ), _states_of_every_worker(b)
        # a later change replaces one key everywhere, the other stays
        b.execute("stateful", "configure", {"model": "m2"})
        expected = {"model": "m2", "temperature": 0.5}
        assert wait_until(lambda: list(_states_of_every_worker(b).values()) == [expected] * 3, 10)

        # kill -9 one worker: its replacement has the state before its first call
        victim = next(iter(_states_of_every_worker(b)))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(
            lambda: (
                len(b._host.pools["stateful"].workers) == 3
                and victim not in [w.pid for w in b._host.pools["stateful"].workers]
            ),
            15,
        )
        assert list(_states_of_every_worker(b).values()) == [expected] * 3

        # an overflow worker, started under load, has it too
        calls = [b.execute("stateful", "state") for _ in range(3)]
        assert all(c["state"] == expected for c in calls)


def test_bridge_state_applies_through_the_async_api_and_survives_update_config() -> None:
    async def main() -> None:
        async with AsyncMLBridge(config(stateful_cfg(pool_size=2))) as b:
            await b.execute("stateful", "configure", {"model": "a"})
            # each call takes 0.2 s, so six at once need both workers
            calls = (b.execute("stateful", "state", {"delay": 0.2}) for _ in range(6))
            results = await asyncio.gather(*calls)
            assert {r["state"]["model"] for r in results} == {"a"}
            assert len({r["pid"] for r in results}) == 2  # both workers answered
            await b.update_config("stateful", pool_size=1)
            after = await b.execute("stateful", "state")
            assert after["state"] == {"model": "a"}

    asyncio.run(main())


def test_state_a_worker_cannot_apply_fails_that_worker_not_the_host() -> None:
    with MLBridge(config(stateful_cfg(pool_size=1))) as b:
        with pytest.raises(errors.MLBridgeError, match="refuses model 'refuse'"):
            b.execute("stateful", "configure", {"model": "refuse"})
        # nothing was recorded: a fresh call works and sees no state
        assert b.execute("stateful", "state")["state"] == {}


def test_stream_result_is_the_handlers_final_reply_sync_and_async() -> None:
    with MLBridge(config(echo_cfg())) as b:
        s = b.stream("echo", "stream", {"n": 3})
        with pytest.raises(RuntimeError, match="after its last chunk"):
            _ = s.result
        assert list(s) == [{"index": i} for i in range(3)]
        assert s.result == {"chunks": 3, "done": True}

    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg())) as b:
            s = b.stream("echo", "stream", {"n": 2})
            assert [c async for c in s] == [{"index": 0}, {"index": 1}]
            assert s.result == {"chunks": 2, "done": True}

    asyncio.run(main())


def test_stream_resource_streams_then_returns_the_final_output() -> None:
    with MLBridge(config(stateful_cfg(pool_size=2))) as b:
        rid = b.create_resource("stateful", "words", {"text": "a b c"})
        s = b.stream_resource("stateful", rid, {"suffix": "!"})
        assert list(s) == [{"delta": "a!"}, {"delta": "b!"}, {"delta": "c!"}]
        assert s.result["count"] == 3
        # the resource is rebuilt on a worker that never saw it (kill the one that has it)
        os.kill(s.result["pid"], signal.SIGKILL)
        assert wait_until(
            lambda: (
                s.result["pid"] not in [w.pid for w in b._host.pools["stateful"].workers]
                and len(b._host.pools["stateful"].workers) == 2
            ),
            15,
        )
        with b.session("stateful") as sess:
            again = sess.stream_resource(rid, {})
            assert [c["delta"] for c in again] == ["a", "b", "c"]
            assert again.result["pid"] != s.result["pid"]
        assert b.execute_resource("stateful", rid, {}) == {"words": ["a", "b", "c"]}

    async def main() -> None:
        async with AsyncMLBridge(config(stateful_cfg(pool_size=1))) as b:
            rid = await b.create_resource("stateful", "words", {"text": "x y"})
            s = b.stream_resource("stateful", rid, {})
            assert [c["delta"] async for c in s] == ["x", "y"]
            assert s.result["count"] == 2
            with pytest.raises(errors.ResourceNotFoundError):
                async for _ in b.stream_resource("stateful", "nope", {}):
                    pass

    asyncio.run(main())
