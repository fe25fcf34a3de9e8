"""The reaper through a real MLBridge: a worker's child dies with its host, records go away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from host_helpers import config, echo_cfg, pid_alive, wait_until
from mlbridge._api import MLBridge
from mlbridge._host.reaper import TOKEN_ENV

pytestmark = pytest.mark.timeout(120)

# Each worker starts a child of its own (same process group and environment) and writes
# "<child pid>" to $SPAWNER_DIR/<worker pid>.
SPAWNER_BRIDGE = textwrap.dedent(
    """
    import os, subprocess
    from mlbridge.bridges.base import BaseBridge

    class SpawnerBridge(BaseBridge):
        name = "spawner"

        def _initialize_framework(self):
            child = subprocess.Popen(["sleep", "600"])
            path = os.path.join(os.environ["SPAWNER_DIR"], str(os.getpid()))
            with open(path + ".tmp", "w") as f:
                f.write(str(child.pid))
            os.rename(path + ".tmp", path)

        def _register_handlers(self):
            self.register_handler("hi", lambda args: "hi")

        def get_framework_info(self):
            return {"name": "spawner", "version": "0"}
    """
)

HOST = textwrap.dedent(
    """
    import json, sys, time
    from mlbridge import MLBridge
    from mlbridge.config import BridgeConfig, MLBridgeConfig
    script, spawned = sys.argv[1:3]
    cfg = MLBridgeConfig(bridges={"spawner": BridgeConfig(
        "spawner", python_script=script, pool_size=2, env={"SPAWNER_DIR": spawned})})
    b = MLBridge(cfg)
    b.execute("spawner", "hi")
    print(json.dumps([w["pid"] for w in b.statistics()["pools"]["spawner"]["workers"]]), flush=True)
    time.sleep(600)
    """
)


def _host(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[int], list[int]]:
    (tmp_path / "spawner.py").write_text(SPAWNER_BRIDGE)
    (tmp_path / "host.py").write_text(HOST)
    spawned = tmp_path / "spawned"
    spawned.mkdir()
    host = subprocess.Popen(
        [sys.executable, str(tmp_path / "host.py"), str(tmp_path / "spawner.py"), str(spawned)],
        stdout=subprocess.PIPE,
        env={**os.environ, "MLBRIDGE_RUNTIME_DIR": str(tmp_path / "rt")},
    )
    assert host.stdout is not None
    workers = json.loads(host.stdout.readline())
    assert wait_until(lambda: all((spawned / str(w)).exists() for w in workers), 10)
    children = [int((spawned / str(w)).read_text()) for w in workers]
    assert all(pid_alive(c) for c in children)
    for w in workers:
        assert TOKEN_ENV.encode() in Path(f"/proc/{w}/environ").read_bytes()
    assert len(list((tmp_path / "rt" / "workers").glob("w-*.rec"))) == 2
    return host, workers, children


def _kill_all(host: subprocess.Popen[bytes], pids: list[int]) -> None:
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    if host.poll() is None:
        host.kill()
    host.wait(10)


def test_a_workers_child_does_not_survive_its_sigkilled_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host, workers, children = _host(tmp_path)
    try:
        host.send_signal(signal.SIGKILL)
        host.wait(10)
        assert wait_until(lambda: not any(pid_alive(w) for w in workers), 10)
        assert all(pid_alive(c) for c in children)  # the parent-death signal does not reach them
        monkeypatch.setenv("MLBRIDGE_RUNTIME_DIR", str(tmp_path / "rt"))
        with MLBridge(config(echo_cfg())) as b:  # the next host start reaps
            assert wait_until(lambda: not any(pid_alive(c) for c in children), 5)
            b.execute("echo", "ping")
            assert len(list((tmp_path / "rt" / "workers").glob("w-*.rec"))) == 1  # its own
        assert list((tmp_path / "rt" / "workers").iterdir()) == []  # close() removed it
    finally:
        _kill_all(host, workers + children)


def test_sigterm_to_a_host_removes_its_records_and_its_workers_children(tmp_path: Path) -> None:
    host, workers, children = _host(tmp_path)
    try:
        host.send_signal(signal.SIGTERM)
        assert host.wait(10) == -signal.SIGTERM
        assert wait_until(lambda: not any(pid_alive(p) for p in workers + children), 5)
        assert list((tmp_path / "rt" / "workers").iterdir()) == []
    finally:
        _kill_all(host, workers + children)
