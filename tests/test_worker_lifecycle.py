"""Worker start-up, bridge loading, boot failures, end of input, signals and crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlbridge._protocol.exit_codes import (
    BOOT_ERROR_MARKER,
    EXIT_BRIDGE_LOAD_FAILED,
    EXIT_FRAMEWORK_INIT_FAILED,
    EXIT_USAGE,
)
from mlbridge.testing import WorkerProcess
from worker_helpers import Spawner, recv_many, wait_busy, write_cleanup_bridge


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


def _boot_error(w: WorkerProcess) -> dict[str, str]:
    err = w.stderr_text()
    lines = [ln for ln in err.splitlines() if ln.startswith(BOOT_ERROR_MARKER)]
    assert len(lines) == 1, err
    info = json.loads(lines[0][len(BOOT_ERROR_MARKER) :])
    assert set(info) == {"error", "error_type", "error_code", "traceback"}
    assert w.proc.stdout is not None
    assert w.proc.stdout.read() == b""  # nothing ever written on the frame stream
    return dict(info)


# ------------------------------------------------------------------------------- loading
def test_builtin_name(spawn: Spawner) -> None:
    w = spawn("echo")
    assert w.request("get_info")["bridge"] == "echo"


@pytest.mark.parametrize("spec", ["mlbridge.bridges.echo:EchoBridge", "mlbridge.bridges.echo"])
def test_module_spec(spawn: Spawner, spec: str) -> None:
    w = spawn(spec)
    assert w.request("echo", {"k": "v"}) == {"k": "v"}


def test_script_path(spawn: Spawner, tmp_path: Path) -> None:
    script, _ = write_cleanup_bridge(tmp_path)
    w = spawn(str(script), settings={"marker": str(tmp_path / "m")})
    assert w.request("hi", {"who": "me"}) == {"hi": "me"}
    assert w.request("marker:hi") == {"hi": "you"}
    assert w.request("get_info")["framework"] == {"name": "marker", "version": "0.0"}


def test_script_path_with_class(spawn: Spawner, tmp_path: Path) -> None:
    script, _ = write_cleanup_bridge(tmp_path)
    w = spawn(f"{script}:MarkerBridge", settings={"marker": str(tmp_path / "m")})
    assert w.request("hi") == {"hi": "you"}


def test_dspex_launch_flags(spawn: Spawner) -> None:
    w = spawn("echo", "--mode", "pool-worker", "--worker-id", "w-7")
    result = w.request("ping")
    assert result["worker_id"] == "w-7"
    assert result["mode"] == "pool-worker"


def test_thread_cap_reaches_the_environment(spawn: Spawner) -> None:
    w = spawn("echo", "--threads", "3")
    assert w.request("env", {"name": "OMP_NUM_THREADS"}) == "3"
    assert w.request("env", {"name": "OPENBLAS_NUM_THREADS"}) == "3"


def test_address_space_limit_turns_a_huge_allocation_into_a_failure(spawn: Spawner) -> None:
    w = spawn("echo", "--limits-json", json.dumps({"address_space_bytes": 1 << 30}))
    reply = w.request("allocate", {"mb": 2048}, raw=True)
    assert reply["success"] is False
    assert reply["error_type"] == "MemoryError"
    assert reply["error_code"] == "model_error"
    assert w.request("allocate", {"mb": 1})["held_mb"] == 1  # and it lives on


def test_unknown_limit_exits_64(spawn: Spawner) -> None:
    w = spawn("echo", "--limits-json", json.dumps({"gpu_hours": 1}))
    assert w.wait(20) == EXIT_USAGE
    assert "gpu_hours" in _boot_error(w)["error"]


# ------------------------------------------------------------------------------- boot failures
@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_such_bridge_xyz", "no bridge named 'no_such_bridge_xyz'"),
        ("mlbridge.bridges.echo:Nope", "'Nope' is not a BaseBridge subclass"),
        ("mlbridge.errors", "exactly one BaseBridge subclass"),
        ("/nonexistent/dir/bridge.py", "does not exist"),
    ],
)
def test_bad_bridge_exits_65_with_boot_error_line(spawn: Spawner, spec: str, fragment: str) -> None:
    w = spawn(spec)
    assert w.wait(20) == EXIT_BRIDGE_LOAD_FAILED == 65
    info = _boot_error(w)
    assert fragment in info["error"]
    assert info["error_code"] == "invalid_configuration"


def test_broken_script_exits_65(spawn: Spawner, tmp_path: Path) -> None:
    script = tmp_path / "broken.py"
    script.write_text("import definitely_not_installed_pkg_42\n")
    w = spawn(str(script))
    assert w.wait(20) == EXIT_BRIDGE_LOAD_FAILED
    info = _boot_error(w)
    assert info["error_type"] == "ModuleNotFoundError"
    assert "definitely_not_installed_pkg_42" in info["error"]
    assert "broken.py" in info["traceback"]


def test_framework_init_failure_exits_66(spawn: Spawner) -> None:
    w = spawn("echo", settings={"fail_boot": "x"})
    assert w.wait(20) == EXIT_FRAMEWORK_INIT_FAILED == 66
    info = _boot_error(w)
    assert info["error_type"] == "RuntimeError"
    assert "told to fail at boot: x" in info["error"]
    assert "_initialize_framework" in info["traceback"]


@pytest.mark.parametrize(
    "args",
    [("--mode", "bogus"), ("--settings-json", "[1, 2]"), ("--settings-json", "{bad")],
    ids=["mode", "settings-not-object", "settings-not-json"],
)
def test_bad_command_line_exits_64(spawn: Spawner, args: tuple[str, ...]) -> None:
    w = spawn("echo", *args)
    assert w.wait(20) == EXIT_USAGE == 64


def test_help_exits_0() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mlbridge.worker", "--help"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0
    assert out.stdout == b""  # even --help keeps off the frame stream
    assert b"bridge" in out.stderr


# ------------------------------------------------------------------------------- end of input
def test_eof_exits_0_within_a_second(spawn: Spawner) -> None:
    w = spawn()
    assert w.request("ping")["status"] == "ok"
    t0 = time.monotonic()
    w.close_input()
    assert w.wait(5) == 0
    assert time.monotonic() - t0 < 1.0


def test_eof_while_a_long_call_runs_exits_0_within_a_second(spawn: Spawner) -> None:
    w = spawn()
    w.send({"id": 1, "command": "sleep", "args": {"seconds": 60}})
    wait_busy(w, "sleep")
    t0 = time.monotonic()
    w.close_input()
    assert w.wait(5) == 0
    assert time.monotonic() - t0 < 1.0


def test_eof_while_a_handler_ignores_cancel_exits_0_within_a_second(spawn: Spawner) -> None:
    w = spawn()
    w.send({"id": 1, "command": "busy", "args": {"seconds": 60}})
    wait_busy(w, "busy")
    t0 = time.monotonic()
    w.close_input()
    assert w.wait(5) == 0
    assert time.monotonic() - t0 < 1.0


def test_queued_work_is_answered_after_eof(spawn: Spawner) -> None:
    w = spawn()
    for i in range(1, 6):
        w.send({"id": i, "command": "echo", "args": {"i": i}})
    w.close_input()
    replies = recv_many(w, 5)
    assert [r["result"]["i"] for r in replies] == [1, 2, 3, 4, 5]
    assert w.wait(5) == 0


def test_eof_in_the_middle_of_a_frame_exits_0(spawn: Spawner) -> None:
    w = spawn()
    w.send_bytes(b"\x00\x00\x01\x00partial")
    w.close_input()
    assert w.wait(5) == 0


# ------------------------------------------------------------------------------- signals
def test_sigterm_runs_cleanup_then_exits(spawn: Spawner, tmp_path: Path) -> None:
    script, marker = write_cleanup_bridge(tmp_path)
    w = spawn(str(script), settings={"marker": str(marker)})
    assert w.request("hi") == {"hi": "you"}
    assert not marker.exists()
    t0 = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait(5) == 0
    assert time.monotonic() - t0 < 2.0
    assert marker.read_text() == "cleaned\n"


def test_sigint_is_handled_like_sigterm(spawn: Spawner, tmp_path: Path) -> None:
    script, marker = write_cleanup_bridge(tmp_path)
    w = spawn(str(script), settings={"marker": str(marker)})
    assert w.request("hi") == {"hi": "you"}
    w.proc.send_signal(signal.SIGINT)
    assert w.wait(5) == 0
    assert marker.read_text() == "cleaned\n"
    assert "Traceback" not in w.stderr_text()


def test_sigterm_during_a_long_call(spawn: Spawner, tmp_path: Path) -> None:
    w = spawn()
    w.send({"id": 1, "command": "sleep", "args": {"seconds": 60}})
    wait_busy(w, "sleep")
    t0 = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    assert w.wait(5) == 0
    assert time.monotonic() - t0 < 2.0
    # the running call is cancelled and still answered before the worker leaves
    reply = w.recv(5)
    assert reply["id"] == 1
    assert reply["error_code"] == "cancelled"


def test_cleanup_command_runs_callbacks(spawn: Spawner, tmp_path: Path) -> None:
    script, marker = write_cleanup_bridge(tmp_path)
    w = spawn(str(script), settings={"marker": str(marker)})
    assert w.request("cleanup")["status"] == "cleaned"
    assert marker.read_text() == "cleaned\n"
    w.close_input()
    assert w.wait(5) == 0
    assert marker.read_text() == "cleaned\ncleaned\n"  # and again at shutdown


# ------------------------------------------------------------------------------- crashes
@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"mode": "exit", "code": 7}, 7),
        ({"mode": "segv"}, -11),  # a real SIGSEGV in C
        ({"mode": "abort"}, -signal.SIGABRT),
        ({"mode": "kill"}, -signal.SIGKILL),
    ],
    ids=["exit", "segv", "abort", "kill"],
)
def test_crash_modes(spawn: Spawner, args: dict[str, object], code: int) -> None:
    w = spawn()
    w.send({"id": 1, "command": "crash", "args": args})
    with pytest.raises(EOFError):
        w.recv(10)
    assert w.wait(10) == code
    assert "crashing on purpose" in w.stderr_text()


def test_unknown_crash_mode_is_a_failure(spawn: Spawner) -> None:
    w = spawn()
    reply = w.request("crash", {"mode": "gently"}, raw=True)
    assert reply["error_code"] == "invalid_request"
    assert w.request("ping")["status"] == "ok"


def test_worker_never_inherits_a_tty_stdout(spawn: Spawner) -> None:
    """fd 1 inside the worker is stderr: a child process it starts cannot write frames either."""
    w = spawn()
    assert w.request("pid") == w.proc.pid
    fd1 = os.readlink(f"/proc/{w.proc.pid}/fd/1")
    fd2 = os.readlink(f"/proc/{w.proc.pid}/fd/2")
    assert fd1 == fd2
