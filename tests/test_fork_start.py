"""Warm start (``start = "fork"``): workers forked from a template that imported the bridge once.

Real hosts, real template and worker processes: the pool comes up forked (each worker its own
pid, session and process group, a child of the one template), the bridge module is imported
once, in the template, while each worker runs its own set-up; a worker killed with SIGKILL is
replaced by a fresh fork; rlimits still apply; OS isolation, a bridge saying ``fork_safe =
False`` and a module that starts a thread at import fall back to spawn with one log line; the
host dying by SIGKILL takes the template and every worker with it; a killed template is
replaced; nothing is left behind when the pool closes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from host_helpers import config, pid_alive, wait_until
from mlbridge import MLBridge, errors
from mlbridge._backends.fork import live_templates
from mlbridge._host.procfs import proc_stat
from mlbridge.config import BridgeConfig, BridgeOptions

BRIDGES = Path(__file__).parent / "bridges"
PROBE = str(BRIDGES / "fork_probe_bridge.py")


def probe_cfg(
    name: str = "probe", script: str = PROBE + ":ForkProbeBridge", *, pool_size: int = 2, **kw: Any
) -> BridgeConfig:
    opts = {"health_check_interval": 0.5, "timeout": 20.0, "startup_timeout": 60.0, **kw}
    opts.setdefault("start", "fork")
    return BridgeConfig(
        name,
        python_script=script,
        pool_size=pool_size,
        options=BridgeOptions(**{"lazy": False, **opts}),
    )


def worker_ids(b: MLBridge, name: str = "probe") -> list[dict[str, Any]]:
    pids = [w["pid"] for w in b.statistics()["pools"][name]["workers"]]
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(200):  # calls land on any idle worker: ask until each has answered
        ids = b.execute(name, "ids", {})
        seen[ids["pid"]] = ids
        if set(pids) <= set(seen):
            break
    return [seen[p] for p in pids]


@pytest.fixture
def probe_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "probe.log"
    monkeypatch.setenv("FORK_PROBE_LOG", str(log))
    return log


def records(log: Path) -> list[tuple[str, int]]:
    return [(w, int(p)) for w, p in (line.split() for line in log.read_text().splitlines())]


def test_pool_is_forked_from_one_template_that_imported_the_bridge_once(probe_log: Path) -> None:
    with MLBridge(config(probe_cfg(pool_size=3))) as b:
        [template] = live_templates("probe")
        ids = worker_ids(b)
        pids = [i["pid"] for i in ids]
        assert len(set(pids)) == 3 and template not in pids and os.getpid() not in pids
        for i in ids:
            assert i["ppid"] == template  # forked by the template
            assert i["pgid"] == i["pid"] == i["sid"]  # each leads its own session and group
        rec = records(probe_log)
        assert [p for w, p in rec if w == "import"] == [template]  # imported once, there
        assert sorted(p for w, p in rec if w == "init") == sorted(pids)  # set up in each worker
        assert b.statistics()["pools"]["probe"]["state"] == "ready"
        for p in pids:  # the reaper's identity check: the host's token, inherited via the template
            with open(f"/proc/{p}/environ", "rb") as f:
                assert b"MLBRIDGE_HOST_TOKEN=" in f.read()
    assert live_templates() == []
    assert not pid_alive(template) and not any(pid_alive(p) for p in pids)


def test_a_killed_forked_worker_is_replaced_by_a_new_fork(probe_log: Path) -> None:
    with MLBridge(config(probe_cfg(pool_size=2))) as b:
        [template] = live_templates("probe")
        victim = worker_ids(b)[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(
            lambda: (
                victim not in [w["pid"] for w in b.statistics()["pools"]["probe"]["workers"]]
                and len(b.statistics()["pools"]["probe"]["workers"]) == 2
            ),
            30,
        )
        ids = worker_ids(b)
        assert all(i["ppid"] == template for i in ids) and victim not in [i["pid"] for i in ids]
        assert b.statistics()["pools"]["probe"]["restarts"] == 1
        assert [p for w, p in records(probe_log) if w == "import"] == [template]
        assert not pid_alive(victim)


def test_rlimits_apply_to_forked_workers() -> None:
    with MLBridge(config(probe_cfg(pool_size=1, limits={"open_files": 77}))) as b:
        [ids] = worker_ids(b)
        assert ids["ppid"] in live_templates("probe") and ids["nofile"] == 77


def test_os_isolation_falls_back_to_spawn_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "mlbridge.fork")
    with MLBridge(config(probe_cfg(pool_size=2, max_open_files=64))) as b:
        ids = worker_ids(b)
        assert all(i["ppid"] == os.getpid() for i in ids)  # spawned by the host
        assert all(i["nofile"] == 64 for i in ids)  # and the limit applies
        assert live_templates() == []
    lines = [r.getMessage() for r in caplog.records if "falls back to spawn" in r.getMessage()]
    assert len(lines) == 1 and "isolation" in lines[0] and "'probe'" in lines[0]


@pytest.mark.parametrize(
    ("script", "why"),
    [
        (PROBE + ":UnforkableBridge", "UnforkableBridge sets fork_safe = False"),
        (str(BRIDGES / "threaded_import_bridge.py"), "2 threads run after importing the bridge"),
    ],
)
def test_a_bridge_unsafe_to_fork_falls_back_to_spawn(
    script: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mlbridge.fork")
    with MLBridge(config(probe_cfg(script=script, pool_size=2))) as b:
        ids = worker_ids(b)
        assert len({i["pid"] for i in ids}) == 2
        assert all(i["ppid"] == os.getpid() for i in ids)
        assert live_templates() == []
    lines = [r.getMessage() for r in caplog.records if "falls back to spawn" in r.getMessage()]
    assert len(lines) == 1 and why in lines[0]


def _started(pid: int) -> int | None:
    """The process's start time in clock ticks (pid and start time name one process)."""
    st = proc_stat(pid)
    return None if st is None else st.start


def test_a_killed_template_takes_its_workers_and_the_pool_recovers(probe_log: Path) -> None:
    with MLBridge(config(probe_cfg(pool_size=2))) as b:
        [template] = live_templates("probe")
        born = _started(template)
        old = [i["pid"] for i in worker_ids(b)]
        os.kill(template, signal.SIGKILL)
        assert wait_until(lambda: not any(pid_alive(p) for p in old), 15)  # parent-death signal
        assert wait_until(
            lambda: (
                len(b.statistics()["pools"]["probe"]["workers"]) == 2
                and not set(old) & {w["pid"] for w in b.statistics()["pools"]["probe"]["workers"]}
            ),
            30,
        )
        [fresh] = live_templates("probe")
        # another process: a pid alone may come round again on a busy machine (CI saw it)
        assert (fresh, _started(fresh)) != (template, born)
        assert all(i["ppid"] == fresh for i in worker_ids(b))


def test_a_template_that_cannot_import_the_bridge_falls_back_and_the_boot_error_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "mlbridge.fork")
    cfg = probe_cfg(script=str(BRIDGES / "broken_import_bridge.py"), pool_size=1, lazy=True)
    with MLBridge(config(cfg)) as b:
        with pytest.raises(errors.MLBridgeError, match="nothing-here"):
            b.execute("probe", "ids", {})
        assert live_templates() == []
    lines = [r.getMessage() for r in caplog.records if "falls back to spawn" in r.getMessage()]
    assert len(lines) == 1 and "cannot import the bridge" in lines[0] and "nothing-here" in lines[0]


HOST_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from host_helpers import config
    from test_fork_start import probe_cfg
    from mlbridge import MLBridge
    from mlbridge._backends.fork import live_templates
    b = MLBridge(config(probe_cfg(pool_size=2))).__enter__()
    pids = [w["pid"] for w in b.statistics()["pools"]["probe"]["workers"]]
    print(json.dumps({{"workers": pids, "templates": live_templates()}}), flush=True)
    time.sleep(600)
    """
)


def test_host_killed_by_sigkill_takes_the_template_and_its_workers() -> None:
    code = HOST_SCRIPT.format(tests=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the host script printed nothing"
        info = json.loads(line)
        procs = info["workers"] + info["templates"]
        assert len(info["workers"]) == 2 and len(info["templates"]) == 1
        assert all(pid_alive(p) for p in procs)
        proc.kill()
        proc.wait(30)
        assert wait_until(lambda: not any(pid_alive(p) for p in procs), 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_start_bridge_takes_start_fork_as_the_option() -> None:
    with MLBridge({"bridges": {}}) as b:
        cfg = b.start_bridge("echo", python_module="echo", pool_size=2, start="fork")
        assert cfg.options.start == "fork"
        assert b.execute("echo", "echo", {"x": 1}) == {"x": 1}
        [template] = live_templates("echo")
        assert wait_until(lambda: len(b.statistics().pools["echo"].workers) == 2, 30)
        assert all(_ppid(w.pid) == template for w in b.statistics().pools["echo"].workers)
    assert live_templates() == []


def test_start_must_be_spawn_or_fork() -> None:
    with pytest.raises(errors.ConfigError, match=r"options\.start.*'spawn' or 'fork'"):
        BridgeOptions(start="zygote")


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.transformers
@pytest.mark.slow
def test_transformers_workers_fork_from_a_template_that_imported_torch(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from hf_fixtures import build_tiny_gpt2

    model = build_tiny_gpt2(tmp_path / "tiny-gpt2")
    cfg = BridgeConfig(
        "hf",
        python_module="transformers",
        pool_size=2,
        settings={"model_cache_dir": str(tmp_path / "cache"), "threads": 1},
        options=BridgeOptions(lazy=False, start="fork", startup_timeout=120.0, timeout=60.0),
    )
    with MLBridge(config(cfg)) as b:
        [template] = live_templates("hf")
        with open(f"/proc/{template}/maps") as f:
            assert "libtorch" in f.read()  # the framework was imported before the fork
        pids = [w["pid"] for w in b.statistics()["pools"]["hf"]["workers"]]
        assert len(set(pids)) == 2 and all(_ppid(p) == template for p in pids)
        args = {"model": str(model), "prompt": "hello", "max_new_tokens": 3}
        first = b.execute("hf", "generate", args)
        assert first["usage"]["completion_tokens"] == 3
        assert b.execute("hf", "generate", args)["text"] == first["text"]  # greedy: the same
    assert not pid_alive(template) and not any(pid_alive(p) for p in pids)
