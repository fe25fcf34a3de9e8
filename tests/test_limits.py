"""OS-enforced limits and isolation per bridge (issue 16), provoked through real workers.

Each limit is hit for real (a memory bomb, a fork bomb, a busy loop, a file-descriptor flood, a
call past its timeout) and must fail its call with an error naming the limit, its value and the
fix, while the host and the other pools carry on and the pool replaces the worker. Where this
machine has cgroups and namespaces both paths run: the cgroup one, and the fallback one with
``MLBRIDGE_ISOLATION_DISABLE`` making the probe pretend cgroups are missing.
"""

from __future__ import annotations

import glob
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_helpers import wait_until
from mlbridge import errors
from mlbridge._api import MLBridge
from mlbridge._backends import isolation
from mlbridge._host.telemetry import WorkerEvent
from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig, bridge_config

BRIDGE = str(Path(__file__).parent / "bridges" / "limits_bridge.py")
CAPS = isolation.probe()
needs_cgroup = pytest.mark.skipif(
    not {"memory", "cpu", "pids"} <= set(CAPS.cgroup_dirs),
    reason=f"no cgroup the host may create here: {CAPS.why_not.get('cgroup')}",
)
needs_netns = pytest.mark.skipif(not CAPS.netns, reason=str(CAPS.why_not.get("netns")))
needs_mountns = pytest.mark.skipif(not CAPS.mountns, reason=str(CAPS.why_not.get("mountns")))


def lim_cfg(name: str = "lim", **options: Any) -> BridgeConfig:
    opts = {"timeout": 30.0, "startup_timeout": 60.0, "health_check_interval": 0.5, **options}
    return BridgeConfig(name, python_script=BRIDGE, options=BridgeOptions(**opts))


def host(*bridges: BridgeConfig) -> MLBridge:
    return MLBridge(MLBridgeConfig(bridges={b.name: b for b in bridges}))


def pids(b: MLBridge, name: str = "lim") -> list[int]:
    return [w["pid"] for w in b.statistics()["pools"][name]["workers"]]


def leftover_cgroups() -> list[str]:
    return [
        p
        for d in set(CAPS.cgroup_dirs.values())
        for p in glob.glob(os.path.join(d, f"mlbridge-{os.getpid()}-*"))
    ]


@pytest.fixture
def no_cgroups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(isolation.DISABLE_ENV, "cgroup")


def assert_limit(exc: errors.ResourceLimitError, limit: str, value: str) -> None:
    text = str(exc)
    assert exc.details["limit"] == limit
    assert exc.details["value"] == value
    assert f"{limit}={value}" in text
    assert "Fix:" in text and f"raise the bridge option {limit}" in text


def recovered(b: MLBridge, old_pid: int) -> None:
    assert wait_until(lambda: len(pids(b)) == 1 and old_pid not in pids(b), 30)
    assert b.execute("lim", "pid") != old_pid


# --------------------------------------------------------------------------- memory


@needs_cgroup
def test_memory_bomb_is_stopped_by_the_kernel_at_max_memory_others_unaffected() -> None:
    events: list[WorkerEvent] = []
    with host(lim_cfg(max_memory="150MB"), lim_cfg("other")) as b:
        b.add_hook(lambda e: events.append(e) if isinstance(e, WorkerEvent) else None)
        other = b.execute("other", "pid")
        info = b.execute("lim", "get_info")["isolation"]
        assert info["mechanisms"]["max_memory"].startswith(f"cgroup v{CAPS.cgroup_version}")
        old = b.execute("lim", "pid")
        with pytest.raises(errors.ResourceLimitError) as caught:
            b.execute("lim", "mem_bomb")
        assert_limit(caught.value, "max_memory", "150MB")
        assert "stopped by the kernel" in str(caught.value)
        assert isinstance(caught.value, errors.WorkerCrashedError)  # the worker is gone
        recovered(b, old)
        assert b.execute("other", "pid") == other  # the other pool never noticed
        assert b.execute("other", "allocate", {"mb": 200}) == 200_000_000  # it has no limit
    exits = [e for e in events if e.event == "exited" and e.framework == "lim"]
    assert exits and "hit the bridge's limit max_memory=150MB" in (exits[0].reason or "")
    assert leftover_cgroups() == []


@pytest.mark.usefixtures("no_cgroups")
def test_memory_bomb_without_cgroups_hits_rlimit_as_and_fails_with_the_limit() -> None:
    with host(lim_cfg(max_memory="300MB")) as b:
        info = b.execute("lim", "get_info")["isolation"]
        assert info["mechanisms"]["max_memory"].startswith("RLIMIT_AS")
        old = b.execute("lim", "pid")
        with pytest.raises(errors.ResourceLimitError) as caught:
            b.execute("lim", "mem_bomb")
        assert_limit(caught.value, "max_memory", "300MB")
        assert "MemoryError" in str(caught.value)
        recovered(b, old)


# --------------------------------------------------------------------------- processes


@needs_cgroup
def test_fork_bomb_is_stopped_at_max_processes_and_its_children_are_killed() -> None:
    with host(lim_cfg(max_processes=12)) as b:
        old = b.execute("lim", "pid")
        info = b.execute("lim", "get_info")["isolation"]
        assert info["mechanisms"]["max_processes"].endswith("pids.max")
        with pytest.raises(errors.ResourceLimitError) as caught:
            b.execute("lim", "fork_bomb", {"max": 200})
        assert_limit(caught.value, "max_processes", "12")
        recovered(b, old)
        survivor = b.execute("lim", "pid")
        with pytest.raises(errors.MLBridgeError) as other:  # an EAGAIN that is not the limit
            b.execute("lim", "eagain")
        assert not isinstance(other.value, errors.ResourceLimitError)
        assert b.execute("lim", "pid") == survivor  # and the worker stays
        # every child the bomb left was killed with its worker (same process group)
        assert wait_until(lambda: _group_members(old) == [], 10)
    assert leftover_cgroups() == []


def _group_members(pgid: int) -> list[int]:
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(Path(stat).parent.name))
    return out


@pytest.mark.usefixtures("no_cgroups")
def test_max_processes_without_cgroups_as_root_is_reported_not_applied() -> None:
    with host(lim_cfg(max_processes=12, max_open_files=100)) as b:
        info = b.execute("lim", "get_info")["isolation"]
    assert info["mechanisms"]["max_processes"] == "RLIMIT_NPROC"
    if os.geteuid() == 0:
        assert "does not bind root" in info["not_applied"]["max_processes"]
    else:
        assert "max_processes" not in info["not_applied"]


# --------------------------------------------------------------------------- cpu


@needs_cgroup
def test_busy_loop_is_held_to_max_cpu() -> None:
    with host(lim_cfg(max_cpu="25%")) as b:
        info = b.execute("lim", "get_info")["isolation"]
        assert "cpu" in info["mechanisms"]["max_cpu"]
        got = b.execute("lim", "busy", {"seconds": 3})
    share = got["cpu"] / got["wall"]
    # the quota holds it at or under 25% of one CPU (a loaded machine may give it less)
    assert share <= 0.25 * 1.3, got


@pytest.mark.usefixtures("no_cgroups")
def test_max_cpu_without_cgroups_pins_whole_cpus_and_says_the_share_is_rounded() -> None:
    with host(lim_cfg(max_cpu="50%")) as b:
        info = b.execute("lim", "get_info")["isolation"]
    assert info["mechanisms"]["max_cpu"].startswith("CPU affinity (1 of")
    assert "rounded up to 1 whole CPU" in info["not_applied"]["max_cpu"]


# --------------------------------------------------------------------------- files, time


def test_fd_flood_is_stopped_at_max_open_files() -> None:
    with host(lim_cfg(max_open_files=64)) as b:
        old = b.execute("lim", "pid")
        with pytest.raises(errors.ResourceLimitError) as caught:
            b.execute("lim", "fd_flood")
        assert_limit(caught.value, "max_open_files", "64")
        assert "Too many open files" in str(caught.value)
        recovered(b, old)


def test_timeout_fails_the_call_naming_the_timeout_and_the_pool_recovers() -> None:
    with host(lim_cfg(timeout="1s", cancel_grace=0.2, max_open_files=64)) as b:
        assert b.execute("lim", "get_info")["isolation"]["mechanisms"]["timeout"].startswith(
            "host timer"
        )
        old = b.execute("lim", "pid")
        with pytest.raises(errors.CallTimeoutError) as caught:
            b.execute("lim", "busy", {"seconds": 30})
        assert "1s timeout" in str(caught.value) and "option 'timeout'" in str(caught.value)
        recovered(b, old)


# --------------------------------------------------------------------------- isolation


@pytest.fixture
def server() -> Iterator[int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hello")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


@needs_netns
def test_network_false_leaves_only_a_private_loopback(server: int) -> None:
    with host(lim_cfg(network=False), lim_cfg("open")) as b:
        assert b.execute("open", "connect", {"port": server}) == "hello"
        with pytest.raises(errors.MLBridgeError) as caught:
            b.execute("lim", "connect", {"port": server})
        assert "Connection refused" in str(caught.value)  # its 127.0.0.1 is not the host's
        info = b.execute("lim", "get_info")["isolation"]
        assert info["mechanisms"]["network"].startswith("network namespace")


def test_network_false_refuses_to_start_where_unshare_is_not_permitted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(isolation.DISABLE_ENV, "netns")
    with host(lim_cfg(network=False, max_boot_failures=1)) as b:
        with pytest.raises(errors.BridgeUnavailableError) as caught:
            b.execute("lim", "pid")
    text = str(caught.value)
    assert "network = false cannot be honoured on this machine" in text
    assert "set network = true" in text


def test_env_allowlist_keeps_host_secrets_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST_SECRET_TOKEN", "s3cr3t-value")
    monkeypatch.setenv("ALLOWED_VAR", "visible")
    cfg = lim_cfg(env_allowlist=["ALLOWED_VAR"]).replace(env={"BRIDGE_OWN": "mine"})
    with host(cfg, lim_cfg("open")) as b:
        env = b.execute("lim", "env")
        assert "HOST_SECRET_TOKEN" not in env
        assert env["ALLOWED_VAR"] == "visible" and env["BRIDGE_OWN"] == "mine"
        assert "s3cr3t-value" not in str(b.execute("lim", "get_info"))
        assert b.execute("open", "env")["HOST_SECRET_TOKEN"] == "s3cr3t-value"  # default: all


def test_private_tmp_is_the_working_directory_and_is_removed_on_exit() -> None:
    with host(lim_cfg(private_tmp=True)) as b:
        cwd = b.execute("lim", "cwd")
        env = b.execute("lim", "env")
        assert env["TMPDIR"] == cwd and os.path.isdir(cwd)
        assert b.execute("lim", "write", {"path": "here.txt"}) == "written"
        assert os.path.exists(os.path.join(cwd, "here.txt"))
    assert not os.path.exists(cwd)


@needs_mountns
def test_read_only_view_refuses_writes_outside_the_private_directory(tmp_path: Path) -> None:
    target = tmp_path / "outside.txt"
    with host(lim_cfg(private_tmp=True, read_only=True)) as b:
        assert b.execute("lim", "write", {"path": "inside.txt"}) == "written"
        with pytest.raises(errors.MLBridgeError) as caught:
            b.execute("lim", "write", {"path": str(target)})
        assert "Read-only file system" in str(caught.value)
    assert not target.exists()


# --------------------------------------------------------------------------- config


def test_limits_in_config_and_start_bridge_keywords() -> None:
    cfg = bridge_config(
        "x", python_script=BRIDGE, max_memory="1GiB", max_cpu="200%", max_processes=50
    )
    assert (cfg.options.max_memory, cfg.options.max_cpu, cfg.options.max_processes) == (
        1024**3,
        200.0,
        50,
    )
    again = BridgeConfig.from_mapping("x", cfg.to_mapping())
    assert again.options == cfg.options
    with pytest.raises(errors.ConfigError) as caught:
        bridge_config("x", python_script=BRIDGE, max_cpu="lots")
    assert "options.max_cpu" in str(caught.value) and '"50%"' in str(caught.value)
    with pytest.raises(errors.ConfigError):
        bridge_config("x", python_script=BRIDGE, network="no")
    with MLBridge(MLBridgeConfig(bridges={})) as b:
        b.start_bridge("y", python_script=BRIDGE, max_open_files=80)
        info = b.execute("y", "get_info")["isolation"]
        assert info["limits"] == {"max_open_files": 80}


# --------------------------------------------------------------------------- doctor


def _doctor(tmp_path: Path, extra_env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    import json
    import subprocess
    import sys

    cfg = tmp_path / "mlbridge.toml"
    cfg.write_text(
        '[bridges.sandbox]\npython_module = "sandbox"\n\n'
        '[bridges.echo]\npython_module = "echo"\n\n'
        '[bridges.echo.options]\nmax_cpu = "50%"\nmax_memory = "1GB"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mlbridge.cli", "doctor", "--config", str(cfg), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **extra_env},
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout)


def test_doctor_reports_each_bridges_mechanisms_and_the_machines(tmp_path: Path) -> None:
    rc, doc = _doctor(tmp_path, {})
    assert rc == (0 if CAPS.netns else 1)
    echo = doc["bridges"]["echo"]["limits"]
    assert set(echo["mechanisms"]) == {"max_memory", "max_cpu", "timeout"}
    sandbox = doc["bridges"]["sandbox"]["limits"]
    assert sandbox["limits"]["network"] is False and sandbox["limits"]["read_only"] is True
    assert {"max_memory", "max_processes", "env_allowlist", "private_tmp"} <= set(
        sandbox["mechanisms"]
    )
    machine = doc["limits"]
    assert set(machine["mechanisms"]) >= {"max_memory", "max_cpu", "max_processes", "network"}
    if "memory" in CAPS.cgroup_dirs:
        assert machine["mechanisms"]["max_memory"].startswith("cgroup v")


def test_doctor_without_cgroups_or_netns_says_what_is_not_applied_and_refused(
    tmp_path: Path,
) -> None:
    rc, doc = _doctor(tmp_path, {isolation.DISABLE_ENV: "cgroup,netns"})
    assert rc == 1
    echo = doc["bridges"]["echo"]["limits"]
    assert echo["mechanisms"]["max_memory"] == "RLIMIT_AS + RLIMIT_DATA"
    assert set(echo["not_applied"]) == {"max_memory", "max_cpu"}
    sandbox = doc["bridges"]["sandbox"]
    assert not sandbox["ok"]
    (problem,) = sandbox["problems"]
    assert problem["kind"] == "isolation" and "network = false" in problem["message"]
    assert "set network = true" in problem["fix"]


@needs_cgroup
def test_cgroups_left_by_a_killed_host_are_removed_by_the_next() -> None:
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    parent = CAPS.cgroup_dirs["pids"]
    stale = os.path.join(parent, f"mlbridge-{gone}-lim-1")
    mine = os.path.join(parent, f"mlbridge-{os.getpid()}-lim-99")
    os.mkdir(stale)
    os.mkdir(mine)
    try:
        removed = isolation.sweep_stale({"pids": parent})
        assert stale in removed and not os.path.exists(stale)
        assert os.path.exists(mine)  # a live host's cgroup is never touched
    finally:
        for p in (stale, mine):
            if os.path.exists(p):
                os.rmdir(p)


def test_cgroup_v2_plan_on_a_delegated_tree(tmp_path: Path) -> None:
    # the cgroup v2 code path, on a folder laid out like a delegated cgroup2 hierarchy (the
    # kernel's enforcement is what the tests above check where this machine has cgroups)
    root = tmp_path / "cg2"
    (root / "app").mkdir(parents=True)
    (root / "app" / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "app" / "cgroup.subtree_control").write_text("")
    parent, why = isolation._probe_v2([(str(root), "cgroup2", "rw")], {"": "/app"})
    assert (parent, why) == (str(root / "app"), "")
    assert set((root / "app" / "cgroup.subtree_control").read_text().split()) == {
        "+memory",
        "+cpu",
        "+pids",
    }
    caps = isolation.Capabilities(2, dict.fromkeys(("memory", "cpu", "pids"), parent), False, False)
    plan = isolation.Plan({"max_memory": 200_000_000, "max_cpu": 25.0, "max_processes": 9})
    isolation._make_cgroups(plan, caps, "w-1", plan.request)
    (cg,) = plan.cgroups
    assert Path(cg, "memory.max").read_text() == "200000000"
    assert Path(cg, "memory.swap.max").read_text() == "0"
    assert Path(cg, "cpu.max").read_text() == "25000 100000"
    assert Path(cg, "pids.max").read_text() == "9"
    assert plan.worker["cgroups"] == [os.path.join(cg, "cgroup.procs")] * 3
    assert plan.mechanisms == {
        "max_memory": "cgroup v2 memory.max",
        "max_cpu": "cgroup v2 cpu.max",
        "max_processes": "cgroup v2 pids.max",
    }
    Path(cg, "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert isolation._oom_kills(cg) == 1


def test_cgroup_v2_without_the_controllers_says_why(tmp_path: Path) -> None:
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("hugetlb\n")
    parent, why = isolation._probe_v2([(str(root), "cgroup2", "rw")], {"": "/"})
    assert parent is None and "lacks the memory, cpu, pids controller(s)" in why


def test_private_directories_left_by_a_killed_host_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    stale = tmp_path / f"mlbridge-tmp-{gone}-lim-1-abc123"
    mine = tmp_path / f"mlbridge-tmp-{os.getpid()}-lim-2-def456"
    other = tmp_path / "mlbridge-0"  # not a private directory (a runtime dir's name)
    for d in (stale, mine, other):
        (d / "sub").mkdir(parents=True)
    assert isolation.sweep_stale_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and mine.exists() and other.exists()


@needs_cgroup
def test_the_socketpair_backend_applies_the_same_limits() -> None:
    with host(lim_cfg(max_memory="150MB", backend="socketpair")) as b:
        info = b.execute("lim", "get_info")["isolation"]
        assert info["mechanisms"]["max_memory"].startswith("cgroup v")
        old = b.execute("lim", "pid")
        with pytest.raises(errors.ResourceLimitError) as caught:
            b.execute("lim", "mem_bomb")
        assert_limit(caught.value, "max_memory", "150MB")
        recovered(b, old)
    assert leftover_cgroups() == []
