"""The ray backend on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``).

One cluster for the session (``ray_cluster`` in conftest: a head with 2 CPUs, a second node with
1 CPU and a ``side`` resource), sized for a 2-core CI machine; the node-removal test runs last
and leaves a fresh ``side`` node behind. Skipped, and only these tests, without the ray extra.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from host_helpers import echo_cfg, wait_until
from mlbridge import MLBridge, errors
from mlbridge.cli import main
from mlbridge.config import (
    BridgeConfig,
    BridgeOptions,
    EnvironmentSpec,
    MLBridgeConfig,
    RayConfig,
    RayOptions,
)

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


@pytest.fixture
def cluster(ray_cluster: Any) -> Any:
    return ray_cluster


def ray_cfg(
    name: str = "echo", *, ray_options: RayOptions | None = None, **kw: Any
) -> BridgeConfig:
    base = echo_cfg(name, backend="ray", startup_timeout=90.0, **kw)
    return BridgeConfig(
        name,
        python_module=base.python_module,
        pool_size=base.pool_size,
        overflow=base.overflow,
        options=base.options,
        ray=ray_options or RayOptions(num_cpus=0.5),
    )


def ray_config(*bridges: BridgeConfig, address: str | None = None) -> MLBridgeConfig:
    return MLBridgeConfig(
        bridges={b.name: b for b in bridges},
        default_bridge=bridges[0].name,
        ray=RayConfig(address=address),
    )


def transports(b: MLBridge, name: str) -> list[Any]:
    return [w.channel.transport for w in b._host.pools[name].workers]


def worker_ids(b: MLBridge, name: str) -> set[str]:
    return {w["id"] for w in b.statistics()["pools"][name]["workers"]}


def test_chaos_kill_a_worker_actor_under_concurrent_load(cluster: Any) -> None:
    cfg = ray_cfg(pool_size=2, checkout_timeout=60.0)
    with MLBridge(ray_config(cfg, address=cluster.address)) as b:
        assert b.execute("echo", "echo", {"warm": 1}) == {"warm": 1}
        assert wait_until(lambda: len(worker_ids(b, "echo")) == 2, 60)

        # One worker busy in a long call; the load runs on the other one.
        slept: dict[str, Any] = {}

        def long_call() -> None:
            try:
                slept["result"] = b.execute("echo", "sleep", {"seconds": 60})
            except Exception as exc:
                slept["error"] = exc

        sleeper = threading.Thread(target=long_call)
        sleeper.start()
        assert wait_until(lambda: any(w.busy for w in b._host.pools["echo"].workers), 30)
        victim = next(w for w in b._host.pools["echo"].workers if w.busy)
        before = worker_ids(b, "echo")

        ok: list[int] = []
        crashed: list[BaseException] = []
        wrong: list[Any] = []
        stop = threading.Event()

        def load(tid: int) -> None:
            i = 0
            while not stop.is_set():
                payload = {"t": tid, "i": i}
                try:
                    got = b.execute("echo", "echo", payload)
                except errors.WorkerCrashedError as exc:
                    crashed.append(exc)
                except Exception as exc:  # anything else is a bug
                    wrong.append(exc)
                else:
                    (ok if got == payload else wrong).append(got if got != payload else i)
                i += 1

        threads = [threading.Thread(target=load, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        assert wait_until(lambda: len(ok) > 20, 30)
        ray.kill(victim.channel.transport.actor)  # the busy worker's actor dies
        sleeper.join(60)
        assert isinstance(slept.get("error"), errors.WorkerCrashedError), slept
        # the pool is back to size, with a new worker in the victim's place
        assert wait_until(
            lambda: len(worker_ids(b, "echo")) == 2 and victim.id not in worker_ids(b, "echo"),
            90,
        )
        # now kill the loaded worker's actor: only its in-flight call may fail
        loaded = next(w for w in b._host.pools["echo"].workers if w.id in before)
        n_ok = len(ok)
        ray.kill(loaded.channel.transport.actor)
        assert wait_until(lambda: loaded.id not in worker_ids(b, "echo"), 30)
        assert wait_until(lambda: len(ok) > n_ok + 20, 60)
        stop.set()
        for t in threads:
            t.join(60)
        assert wrong == []  # no reply reached the wrong caller, no other error kind
        assert len(crashed) <= 4  # at most one in-flight call per load thread
        assert wait_until(lambda: len(worker_ids(b, "echo")) == 2, 90)
        stats = b.statistics().pools["echo"]
        assert stats.restarts >= 2
        assert {w.backend for w in stats.workers} == {"ray"}


def test_resources_and_sessions_survive_an_actor_death(cluster: Any) -> None:
    with MLBridge(ray_config(ray_cfg(pool_size=2), address=cluster.address)) as b:
        rid = b.create_resource("echo", "counter", {"start": 1})
        assert b.execute_resource("echo", rid, {})["value"] == 2
        with b.session("echo") as s:
            srid = s.create_resource("counter", {"start": 10})
            first = s.execute_resource(srid, {})
            assert first["value"] == 11
            assert s.execute("session") == s.id
            # the session's worker: kill its actor
            (victim,) = [t for t in transports(b, "echo") if t.pid == first["pid"]]
            ray.kill(victim.actor)
            assert wait_until(
                lambda: (
                    first["pid"]
                    not in [w["pid"] for w in b.statistics()["pools"]["echo"]["workers"]]
                ),
                30,
            )
            again = s.execute_resource(srid, {})
            assert again["value"] == 12 and again["pid"] != first["pid"]  # rebuilt elsewhere
            assert s.execute("session") == s.id
        assert b.execute_resource("echo", rid, {})["value"] == 3


def test_streaming_cancel_timeout_and_callback_into_a_local_pool(cluster: Any) -> None:
    remote = ray_cfg("a", pool_size=1)
    local = echo_cfg("b", pool_size=1)
    with MLBridge(ray_config(remote, local, address=cluster.address)) as b:
        assert list(b.stream("a", "stream", {"n": 3})) == [{"index": i} for i in range(3)]
        it = b.stream("a", "stream", {"n": 1000, "delay": 0.01})
        assert next(it) == {"index": 0}
        it.close()  # cancels in the Ray-hosted worker, which stays
        assert b.execute("a", "echo", {"after": "cancel"}) == {"after": "cancel"}
        with pytest.raises(errors.CallTimeoutError, match="stays in the pool"):
            b.execute("a", "sleep", {"seconds": 5}, timeout=0.5)
        # a call-back from the Ray-hosted worker into the local pool
        out = b.execute("a", "call_host", {"bridge": "b", "command": "pid"})
        local_pid = b.statistics()["pools"]["b"]["workers"][0]["pid"]
        assert out == local_pid
        stats = b.statistics()
        (ra,) = stats["pools"]["a"]["workers"]
        (lb,) = stats["pools"]["b"]["workers"]
        assert ra["backend"] == "ray" and lb["backend"] == "local"
        assert ra["node"] and ra["pid"] and lb["node"]


def test_status_shows_node_pid_backend(cluster: Any, tmp_path: Any, capsys: Any) -> None:
    toml = tmp_path / "mlbridge.toml"
    toml.write_text(
        f'[ray]\naddress = "{cluster.address}"\n'
        '[bridges.echo]\npool_size = 1\nbackend = "ray"\n[bridges.echo.options]\n'
        "startup_timeout = 90\n[bridges.echo.ray]\nnum_cpus = 0.5\n"
    )
    assert main(["status", "--json", "--config", str(toml)]) == 0
    doc = json.loads(capsys.readouterr().out)
    (w,) = doc["pools"]["echo"]["workers"]
    assert w["backend"] == "ray" and w["node"] and isinstance(w["pid"], int)
    assert main(["status", "--config", str(toml)]) == 0
    text = capsys.readouterr().out
    assert "NODE" in text and "ray" in text


def test_overflow_and_heartbeats_on_ray_workers(cluster: Any) -> None:
    cfg = ray_cfg(pool_size=1, overflow=1, heartbeat_timeout=2.0, idle_timeout=60.0)
    with MLBridge(ray_config(cfg, address=cluster.address)) as b:
        assert b.execute("echo", "echo", {"a": 1}) == {"a": 1}
        out: list[Any] = []
        calls = [
            threading.Thread(target=lambda: out.append(b.execute("echo", "sleep", {"seconds": 3})))
            for _ in range(2)
        ]
        for t in calls:
            t.start()
        assert wait_until(
            lambda: any(w["overflow"] for w in b.statistics()["pools"]["echo"]["workers"]), 60
        )
        for t in calls:
            t.join(90)
        assert len(out) == 2 and len({o["pid"] for o in out}) == 2  # two workers served them
        # a worker that stops answering heartbeats is killed and replaced
        (core,) = [w for w in b._host.pools["echo"].workers if not w.overflow]
        core.channel.transport.signal(signal.SIGSTOP)
        assert wait_until(lambda: core.id not in worker_ids(b, "echo"), 30)
        assert b.execute("echo", "echo", {"b": 2}) == {"b": 2}
        assert b.statistics().pools["echo"].restarts >= 1


@pytest.mark.envs
def test_a_bridge_environment_on_a_ray_worker(
    cluster: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLBRIDGE_CACHE_DIR", str(tmp_path))
    script = str(Path(__file__).parent / "bridges" / "six_version_bridge.py")
    cfg = BridgeConfig(
        "six",
        python_script=script,
        environment=EnvironmentSpec(("six==1.16.0",)),
        required_packages=("six",),
        options=BridgeOptions(backend="ray", startup_timeout=90.0),
        ray=RayOptions(num_cpus=0.5),
    )
    with MLBridge(ray_config(cfg, address=cluster.address)) as b:
        out = b.execute("six", "versions", {})
        assert out["six"] == "1.16.0" and out["prefix"].startswith(str(tmp_path / "envs"))
        (w,) = b.statistics()["pools"]["six"]["workers"]
        assert w["backend"] == "ray" and w["pid"] == out["pid"]


def test_removing_one_node_of_two(cluster: Any) -> None:
    far = ray_cfg("far", pool_size=1, ray_options=RayOptions(num_cpus=0.5, resources={"side": 1}))
    near = ray_cfg("near", pool_size=1)
    with MLBridge(ray_config(far, near, address=cluster.address)) as b:
        assert b.execute("far", "echo", {"x": 1}) == {"x": 1}
        assert b.execute("near", "echo", {"y": 1}) == {"y": 1}
        (t_far,) = transports(b, "far")
        (t_near,) = transports(b, "near")
        assert t_far.node_id == cluster.side.node_id != t_near.node_id
        failed: dict[str, Any] = {}

        def long_call() -> None:
            try:
                b.execute("far", "sleep", {"seconds": 60})
            except Exception as exc:
                failed["error"] = exc

        th = threading.Thread(target=long_call)
        th.start()
        assert wait_until(lambda: b._host.pools["far"].workers[0].busy, 30)
        cluster.remove_node(cluster.side, allow_graceful=False)
        th.join(90)
        assert isinstance(failed.get("error"), errors.WorkerCrashedError), failed
        # the other node's pool never noticed
        assert b.execute("near", "echo", {"y": 2}) == {"y": 2}
        assert transports(b, "near") == [t_near]
        # a node with the resource comes back: the far pool is replaced there
        cluster.side = cluster.add_node(num_cpus=1, resources={"side": 1})
        t0 = time.monotonic()
        assert b.execute("far", "echo", {"x": 2}, timeout=120) == {"x": 2}
        assert time.monotonic() - t0 < 120
        (t_new,) = transports(b, "far")
        assert t_new.node_id == cluster.side.node_id
