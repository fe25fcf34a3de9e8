"""The orphan reaper through real processes: bystanders survive, proven leftovers do not.

Every "worker" here is a real ``python -m mlbridge.worker`` started the way the local backend
starts one (its own session, the host's token in its environment); every decoy is a real
process that a stale record names with its true pid, start time and process group, so that only
the reaper's identity checks stand between it and SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_helpers import pid_alive, wait_until
from mlbridge._host.reaper import TOKEN_ENV, PidRegistry, WorkerRecord

pytestmark = pytest.mark.timeout(120)

# A bridge whose worker starts a child of its own (same session and process group, same
# environment) and writes the child's pid to $SPAWNER_PIDFILE before serving.
SPAWNER_BRIDGE = textwrap.dedent(
    """
    import os, subprocess
    from mlbridge.bridges.base import BaseBridge

    class SpawnerBridge(BaseBridge):
        name = "spawner"

        def _initialize_framework(self):
            child = subprocess.Popen(["sleep", "600"])
            tmp = os.environ["SPAWNER_PIDFILE"] + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(child.pid))
            os.rename(tmp, os.environ["SPAWNER_PIDFILE"])

        def _register_handlers(self):
            pass

        def get_framework_info(self):
            return {"name": "spawner", "version": "0"}
    """
)

# A host stand-in: a PidRegistry with its default exit hooks that starts one spawner worker
# like the local backend does, records it, reports the pids, then exits as told.
HOST_SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, sys, time
    from mlbridge._host.reaper import PidRegistry

    records, bridge, pidfile, how = sys.argv[1:5]
    reg = PidRegistry(records)
    worker = subprocess.Popen(
        [sys.executable, "-m", "mlbridge.worker", bridge],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **reg.worker_env(), "SPAWNER_PIDFILE": pidfile},
        start_new_session=True,
    )
    reg.register(worker.pid)
    while not os.path.exists(pidfile):
        time.sleep(0.02)
    with open(pidfile) as f:
        child = int(f.read())
    print(json.dumps({"worker": worker.pid, "child": child, "token": reg.token}), flush=True)
    if how in ("close", "exit"):
        sys.stdin.readline()  # once the test has seen both processes alive
    if how == "close":
        reg.close()
        print("closed", flush=True)
    elif how == "exit":
        sys.exit(0)  # no close(): atexit must clean up
    time.sleep(600)
    """
)


class Procs:
    """Processes a test started (and pids it learnt), all gone when the test ends."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def start(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        p: subprocess.Popen[bytes] = subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload]
        self.popens.append(p)
        return p

    def close(self) -> None:
        for pid in self.pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for p in self.popens:
            if p.poll() is None:
                p.kill()
            p.wait(10)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.close()


def _stat(pid: int) -> tuple[int, int]:
    """(process group, start time) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[2]), int(fields[19])


def _dead_host(procs: Procs) -> tuple[int, int]:
    """(pid, start time) of a host process that has exited."""
    p = procs.start([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    _, start = _stat(p.pid)
    assert p.stdin is not None
    p.stdin.close()
    p.wait(10)
    return p.pid, start


def _plant(records: Path, pid: int, host: tuple[int, int], token: str) -> Path:
    """A stale, well-formed record naming ``pid`` exactly as it is (pid, start, group)."""
    pgid, start = _stat(pid)
    rec = WorkerRecord(pid, start, pgid, host[0], host[1], token)
    path = records / rec.filename
    path.write_bytes(rec.encode())
    return path


def _spawner(tmp_path: Path) -> Path:
    path = tmp_path / "spawner_bridge.py"
    path.write_text(SPAWNER_BRIDGE)
    return path


def _records(tmp_path: Path) -> Path:
    path = tmp_path / "records"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _wait_ready(pid: int, marker: bytes, where: str = "cmdline") -> None:
    assert wait_until(lambda: marker in Path(f"/proc/{pid}/{where}").read_bytes(), 10)


# ---------------------------------------------------------------------- bystanders
def test_decoys_named_by_stale_records_survive_a_reap(tmp_path: Path, procs: Procs) -> None:
    records = _records(tmp_path)
    host = _dead_host(procs)
    dead_token = PidRegistry(tmp_path / "other", exit_hooks=False).token
    log = tmp_path / "mlbridge.worker.log"
    log.write_text("")

    # 1. `tail -f mlbridge.worker.log`, leading its own group (as a worker would) ...
    tail_own = procs.start(["tail", "-f", str(log)], start_new_session=True)
    # ... and one in this test's own process group: a group kill would hit pytest itself.
    tail_ours = procs.start(["tail", "-f", str(log)])
    # 2. `bash -c '... mlbridge.worker ...'` with children of its own.
    bash = procs.start(
        ["bash", "-c", "sleep 600 & sleep 600 & echo mlbridge.worker >/dev/null; wait"],
        start_new_session=True,
    )
    # 3. A live worker of another running host (its own registry, directory and token).
    other = PidRegistry(tmp_path / "other-host", exit_hooks=False)
    live = procs.start(
        [sys.executable, "-m", "mlbridge.worker", "echo"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **other.worker_env()},
        start_new_session=True,
    )
    other.register(live.pid)
    for p in (tail_own, tail_ours, bash):
        _wait_ready(p.pid, b"mlbridge.worker")
    _wait_ready(live.pid, other.token.encode(), "environ")
    assert wait_until(lambda: len(_group(bash.pid)) == 3, 10)
    bash_children = [p for p in _group(bash.pid) if p != bash.pid]

    decoys = [tail_own.pid, tail_ours.pid, bash.pid, live.pid]
    planted = [_plant(records, pid, host, dead_token) for pid in decoys]
    # Each decoy's pid, start time and group are right; what it lacks is the dead host's token.
    assert PidRegistry(records, exit_hooks=False).reap() == []

    for pid in [*decoys, *bash_children]:
        assert pid_alive(pid), pid
    assert all(not p.exists() for p in planted)  # stale records of dead hosts are dropped
    assert other.reap() == []  # the other host's own record is untouched and its host lives
    assert pid_alive(live.pid)
    other.close()


def _group(pgid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if _stat(int(name))[0] == pgid and pid_alive(int(name)):
                    found.append(int(name))
            except (OSError, IndexError):
                continue
    return found


def test_a_record_of_a_live_host_is_never_reaped(tmp_path: Path, procs: Procs) -> None:
    records = _records(tmp_path)
    reg = PidRegistry(records, exit_hooks=False)
    live = procs.start(
        [sys.executable, "-m", "mlbridge.worker", "echo"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **reg.worker_env()},
        start_new_session=True,
    )
    _wait_ready(live.pid, reg.token.encode(), "environ")
    reg.register(live.pid)
    assert PidRegistry(records, exit_hooks=False).reap() == []
    assert live.poll() is None
    assert len(list(records.glob("w-*.rec"))) == 1
    reg.close()  # the host closing kills what is left of its worker and drops the record
    assert live.wait(10) == -signal.SIGKILL
    assert list(records.iterdir()) == []


def test_a_reused_pid_with_another_start_time_is_left_alone(tmp_path: Path, procs: Procs) -> None:
    records = _records(tmp_path)
    reg = PidRegistry(records, exit_hooks=False)
    # Carries the right token and leads its group, but the record's start time is not its own.
    p = procs.start(
        ["sleep", "600"], env={**os.environ, **reg.worker_env()}, start_new_session=True
    )
    _wait_ready(p.pid, reg.token.encode(), "environ")
    pgid, start = _stat(p.pid)
    host = _dead_host(procs)
    rec = WorkerRecord(p.pid, start - 1, pgid, host[0], host[1], reg.token)
    (records / rec.filename).write_bytes(rec.encode())
    assert PidRegistry(records, exit_hooks=False).reap() == []
    assert p.poll() is None


# ---------------------------------------------------------------------- leftovers
def _start_host(
    tmp_path: Path, procs: Procs, how: str
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    pidfile = tmp_path / f"child-{how}.pid"
    host = procs.start(
        [
            sys.executable,
            str(script),
            str(_records(tmp_path)),
            str(_spawner(tmp_path)),
            str(pidfile),
            how,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert host.stdout is not None
    info = json.loads(host.stdout.readline())
    procs.pids += [info["worker"], info["child"]]
    assert pid_alive(info["worker"]) and pid_alive(info["child"])
    assert _stat(info["child"])[0] == info["worker"]  # the grandchild is in the worker's group
    return host, info


def test_a_workers_child_does_not_survive_a_sigkilled_host(tmp_path: Path, procs: Procs) -> None:
    host, info = _start_host(tmp_path, procs, "sleep")
    records = _records(tmp_path)
    assert len(list(records.glob("w-*.rec"))) == 1
    host.send_signal(signal.SIGKILL)
    host.wait(10)
    # The worker sees its input close and exits; its own child is still there ...
    assert wait_until(lambda: not pid_alive(info["worker"]), 10)
    assert pid_alive(info["child"])
    # ... until the next host starts and reaps: the leader is gone, but a member of its
    # recorded group carries the dead host's token.
    assert PidRegistry(records, exit_hooks=False).reap() == [info["worker"]]
    assert wait_until(lambda: not pid_alive(info["child"]), 5)
    assert list(records.iterdir()) == []


@pytest.mark.parametrize("how", ["close", "exit", "term"])
def test_records_are_removed_and_leftovers_killed_at_every_exit(
    tmp_path: Path, procs: Procs, how: str
) -> None:
    host, info = _start_host(tmp_path, procs, how)
    records = _records(tmp_path)
    if how in ("close", "exit"):
        assert host.stdin is not None
        host.stdin.write(b"go\n")  # (it acts only now: _start_host saw both alive first)
        host.stdin.flush()
    if how == "close":
        assert host.stdout is not None
        assert host.stdout.readline() == b"closed\n"
        assert host.poll() is None  # the host lives on; its record is gone already
    elif how == "exit":
        assert host.wait(10) == 0
    else:
        host.send_signal(signal.SIGTERM)
        assert host.wait(10) == -signal.SIGTERM  # still dies by SIGTERM, after cleaning up
    assert wait_until(lambda: not pid_alive(info["worker"]), 5)
    assert wait_until(lambda: not pid_alive(info["child"]), 5)
    assert list(records.iterdir()) == []


def test_a_term_handler_of_the_application_is_never_replaced(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import signal, sys
        handler = lambda *a: None
        signal.signal(signal.SIGTERM, handler)
        from mlbridge._host.reaper import PidRegistry
        PidRegistry({str(tmp_path / "records")!r})
        assert signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unregister_kills_what_an_exited_worker_left_in_its_group(
    tmp_path: Path, procs: Procs
) -> None:
    records = _records(tmp_path)
    reg = PidRegistry(records, exit_hooks=False)
    pidfile = tmp_path / "child.pid"
    worker = procs.start(
        [sys.executable, "-m", "mlbridge.worker", str(_spawner(tmp_path))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **reg.worker_env(), "SPAWNER_PIDFILE": str(pidfile)},
        start_new_session=True,
    )
    reg.register(worker.pid)
    assert wait_until(pidfile.exists, 20)
    child = int(pidfile.read_text())
    procs.pids.append(child)
    assert worker.stdin is not None
    worker.stdin.close()  # the worker exits normally ...
    assert worker.wait(10) == 0
    assert pid_alive(child)  # ... and its child would stay behind forever
    reg.unregister(worker.pid)
    assert wait_until(lambda: not pid_alive(child), 5)
    assert list(records.iterdir()) == []
    reg.close()


def test_worker_env_carries_a_fresh_token_per_host(tmp_path: Path) -> None:
    a = PidRegistry(tmp_path / "a", exit_hooks=False)
    b = PidRegistry(tmp_path / "b", exit_hooks=False)
    assert set(a.worker_env()) == {TOKEN_ENV}
    assert len(a.token) == 32 and a.token != b.token


# ---------------------------------------------------------------------- what reap reads
def test_reap_reads_and_unlinks_only_well_formed_records(tmp_path: Path, procs: Procs) -> None:
    records = _records(tmp_path)
    host = _dead_host(procs)
    token = "0" * 32
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    ok = WorkerRecord(999_999_999, 1, 999_999_999, host[0], host[1], token)
    junk = {
        "123": b"1 2\n",  # the old format, or anyone's file
        f"w-1-{token}.rec": b"not json",
        f"w-2-{token}.rec": ok.encode(),  # content names another pid than the file name
        "w-3-short.rec": b"{}",
        ok.filename + ".bak": ok.encode(),
    }
    for name, data in junk.items():
        (records / name).write_bytes(data)
    link = WorkerRecord(999_999_998, 1, 999_999_998, host[0], host[1], token).filename
    (records / link).symlink_to(outside)
    fifo = WorkerRecord(999_999_997, 1, 999_999_997, host[0], host[1], token).filename
    os.mkfifo(records / fifo)
    (records / ok.filename).write_bytes(ok.encode())

    assert PidRegistry(records, exit_hooks=False).reap() == []
    assert not (records / ok.filename).exists()  # well-formed, host dead, process gone
    left = sorted(p.name for p in records.iterdir())
    assert left == sorted([*junk, link, fifo])
    assert outside.read_text() == "keep me"
    for name, data in junk.items():
        assert (records / name).read_bytes() == data


def test_unregister_of_a_worker_that_still_runs_only_drops_its_record(
    tmp_path: Path, procs: Procs
) -> None:
    records = _records(tmp_path)
    reg = PidRegistry(records, exit_hooks=False)
    worker = procs.start(
        [sys.executable, "-m", "mlbridge.worker", "echo"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **reg.worker_env()},
        start_new_session=True,
    )
    _wait_ready(worker.pid, reg.token.encode(), "environ")
    reg.register(worker.pid)
    reg.unregister(worker.pid)
    assert list(records.iterdir()) == []
    assert worker.poll() is None
    reg.close()  # nothing recorded any more: close does not touch it either
    assert worker.poll() is None
