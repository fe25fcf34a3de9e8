"""The ``mlbridge`` CLI, through ``cli.main(argv)`` in-process and once as a real subprocess.

Every command that starts workers runs real ``echo`` worker processes; the autouse fixture fails
a test that leaves one behind (and kills it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import psutil
import pytest

from mlbridge import cli
from mlbridge.cli import _errors
from mlbridge.cli._format import write_json as real_write_json
from mlbridge.errors import (
    BridgeBrokenError,
    CallTimeoutError,
    CheckoutTimeoutError,
    ConfigError,
    FrameworkNotFoundError,
    ProtocolError,
    RemoteError,
    UnknownCommandError,
    WorkerCrashedError,
)

ECHO_TOML = """\
default_bridge = "echo"

[bridges.echo]
python_module = "echo"
pool_size = {pool_size}

[bridges.echo.options]
health_check_interval = 0.5
startup_timeout = 30
"""


def pid_alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def wait_until(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


def _worker_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "mlbridge.worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """No MLBRIDGE_* variables from outside, cwd in tmp_path, and no worker left behind."""
    for var in list(os.environ):
        if var.startswith("MLBRIDGE_"):
            monkeypatch.delenv(var)
    # A private runtime dir: a `mlbridge serve` running elsewhere must not answer these tests.
    monkeypatch.setenv("MLBRIDGE_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.chdir(tmp_path)
    yield
    leftovers = [p for p in _worker_children() if p.status() != psutil.STATUS_ZOMBIE]
    for p in leftovers:
        p.kill()
    assert not leftovers, f"workers left running: {[p.pid for p in leftovers]}"


def write_config(tmp_path: Path, text: str | None = None, *, pool_size: int = 1) -> str:
    path = tmp_path / "mlbridge.toml"
    path.write_text(text if text is not None else ECHO_TOML.format(pool_size=pool_size))
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- call


def test_call_prints_the_result_as_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    args = {"a": 1, "nested": {"list": [1, 2, 3], "text": "héllo"}}
    code, out, err = run(capsys, "call", "echo", "echo", json.dumps(args), "--config", cfg)
    assert code == 0
    # stderr holds only the notice that no running host was found
    assert err.splitlines() == [line for line in err.splitlines() if "throw-away host" in line]
    assert json.loads(out) == args


def test_call_runs_a_real_worker_and_stops_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path)
    code, out, _ = run(capsys, "call", "echo", "pid", "--config", cfg)
    assert code == 0
    pid = json.loads(out)
    assert isinstance(pid, int)
    assert pid not in (os.getpid(), os.getppid())
    assert wait_until(lambda: not pid_alive(pid), 5), f"worker {pid} outlived the command"


def test_call_finds_mlbridge_toml_in_the_working_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_config(
        tmp_path, ECHO_TOML.format(pool_size=1) + '[bridges.echo.settings]\nmark = "here"\n'
    )
    code, out, _ = run(capsys, "call", "echo", "settings")
    assert code == 0
    assert json.loads(out) == {"mark": "here"}


def test_call_stream_prints_each_chunk_as_it_arrives(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path)
    written: list[tuple[float, Any]] = []

    def spy(obj: Any, **kw: Any) -> None:
        written.append((time.monotonic(), obj))
        real_write_json(obj, **kw)

    monkeypatch.setattr("mlbridge.cli._commands.write_json", spy)
    argv = ["call", "echo", "stream", '{"n": 3, "delay": 0.25}', "--stream", "--final"]
    code, out, _ = run(capsys, *argv, "--config", cfg)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [{"index": 0}, {"index": 1}, {"index": 2}, {"chunks": 3, "done": True}]
    # Printed as they came, not all at the end: the worker sleeps 0.25 s between chunks.
    assert written[2][0] - written[0][0] >= 0.35


def test_call_stream_without_final_prints_only_chunks(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path)
    code, out, _ = run(capsys, "call", "echo", "stream", '{"n": 2}', "--stream", "--config", cfg)
    assert code == 0
    assert [json.loads(x) for x in out.splitlines()] == [{"index": 0}, {"index": 1}]


@pytest.mark.parametrize(
    ("json_args", "expected"),
    [
        ('{"a": 1', "not valid JSON"),
        ("{'a': 1}", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("42", "must be a JSON object"),
    ],
)
def test_call_bad_json_args_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, json_args: str, expected: str
) -> None:
    cfg = write_config(tmp_path)
    code, out, err = run(capsys, "call", "echo", "echo", json_args, "--config", cfg)
    assert code == 2
    assert out == ""
    assert expected in err
    assert "Fix:" in err
    assert err.startswith("mlbridge: usage error:")


def test_call_reads_json_args_from_stdin(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    cfg = write_config(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"from": "stdin"}'))
    code, out, _ = run(capsys, "call", "echo", "echo", "-", "--config", cfg)
    assert code == 0
    assert json.loads(out) == {"from": "stdin"}


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["call", "nope", "echo"], 4, ["no bridge named 'nope'", "configured: echo", "Fix:"]),
        (["call", "echo", "no_such_cmd"], 5, ["UnknownCommandError", "no_such_cmd", "fix:"]),
        (
            ["call", "echo", "fail", '{"type": "ValueError", "message": "bad input x"}'],
            5,
            ["ValueError", "bad input x"],
        ),
        (["call", "echo", "sleep", '{"seconds": 10}', "--timeout", "0.3"], 6, ["0.3s timeout"]),
        (["call", "echo", "crash", '{"mode": "exit", "code": 3}'], 7, ["exit", "3"]),
        (["call", "echo", "echo", "--timeout", "-1"], 2, ["positive"]),
        (["call", "echo"], 2, ["--help"]),
    ],
)
def test_call_errors_have_a_message_and_a_distinct_exit_code(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], code: int, words: list[str]
) -> None:
    cfg = write_config(tmp_path)
    t0 = time.monotonic()
    got, out, err = run(capsys, *argv, "--config", cfg)
    assert time.monotonic() - t0 < 15
    assert got == code, err
    assert out == ""
    assert err.startswith("mlbridge: ")
    for word in words:
        assert word in err


def test_config_error_exit_code_names_the_key_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, '[bridges.echo]\npython_module = "echo"\npool_size = "two"\n')
    code, out, err = run(capsys, "call", "echo", "echo", "--config", cfg)
    assert code == 3
    assert out == ""
    assert "bridges.echo.pool_size" in err
    assert "configuration error" in err


def test_missing_config_file_is_a_config_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "call", "echo", "echo", "--config", str(tmp_path / "nope.toml"))
    assert code == 3
    assert "does not exist" in err


def test_exit_codes_are_distinct_per_error_kind() -> None:
    kinds = [
        _errors.UsageError("x"),
        ConfigError("x"),
        FrameworkNotFoundError("x"),
        UnknownCommandError("x"),
        CallTimeoutError("x"),
        WorkerCrashedError("x"),
        BridgeBrokenError("x"),
        ProtocolError("x"),
    ]
    codes = [_errors.exit_code_for(k) for k in kinds]
    assert len(set(codes)) == len(codes)
    assert 0 not in codes
    assert 1 not in codes
    assert _errors.exit_code_for(RemoteError("x")) == _errors.exit_code_for(UnknownCommandError(""))
    assert _errors.exit_code_for(CheckoutTimeoutError("x")) == _errors.EXIT_TIMEOUT
    assert _errors.exit_code_for(RuntimeError("x")) == 1


def test_real_subprocess_call(tmp_path: Path) -> None:
    write_config(tmp_path)  # found by discovery from the working directory
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBRIDGE_")}
    env["MLBRIDGE_RUNTIME_DIR"] = str(tmp_path / "runtime")
    proc = subprocess.run(
        [sys.executable, "-m", "mlbridge.cli", "call", "echo", "echo", '{"a":1}'],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"a": 1}
    # stdout is the result alone; stderr says that no running host was found (one line).
    (notice,) = proc.stderr.splitlines()
    assert "starts a throw-away host" in notice


# --------------------------------------------------------------------------- status


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def test_status_json_shows_the_live_workers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, pool_size=2)
    seen: dict[int, tuple[bool, str]] = {}

    def spy(obj: Any, **kw: Any) -> None:
        # Checked at the moment status prints, while its host still holds the pool.
        for pool in obj["pools"].values():
            for w in pool["workers"]:
                seen[w["pid"]] = (pid_alive(w["pid"]), _cmdline(w["pid"]))
        real_write_json(obj, **kw)

    monkeypatch.setattr("mlbridge.cli._commands.write_json", spy)
    code, out, err = run(capsys, "status", "--json", "--config", cfg)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["config"] == cfg
    assert doc["healthy"] is True
    assert doc["host_pid"] == os.getpid()
    pool = doc["pools"]["echo"]
    assert pool["state"] == "ready"
    assert pool["pool_size"] == 2
    pids = [w["pid"] for w in pool["workers"]]
    assert len(set(pids)) == 2
    for pid in pids:
        alive, cmdline = seen[pid]
        assert alive, f"worker {pid} was not running when status printed it"
        assert "mlbridge.worker" in cmdline
    for w in pool["workers"]:
        assert w["rss_bytes"] > 1_000_000  # from the heartbeat round
        assert w["requests"] == 0
        assert w["errors"] == 0
        assert w["uptime"] >= 0
    assert pool["uptime"] > 0
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 5)


def test_status_human_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pool_size=2)
    code, out, _ = run(capsys, "status", "--config", cfg)
    assert code == 0
    assert "echo: ready  workers 2/2" in out
    header = next(line for line in out.splitlines() if "WORKER" in line)
    assert header.split() == [
        "WORKER", "PID", "STATE", "RSS", "REQUESTS", "ERRORS", "UPTIME", "OVERFLOW",
        "NODE", "BACKEND",
    ]  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("echo-")]
    assert len(rows) == 2
    assert all(r[1].isdigit() and r[3] != "-" for r in rows)
    assert all(r[-1] == "local" and r[-2] != "-" for r in rows)  # where each worker runs


def test_status_unknown_bridge(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    code, _, err = run(capsys, "status", "--bridge", "nope", "--config", cfg)
    assert code == 4
    assert "nope" in err


def test_status_reports_a_broken_bridge(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = ECHO_TOML.format(pool_size=1) + (
        "max_boot_failures = 1\n\n"
        '[bridges.bad]\npython_module = "echo"\n[bridges.bad.options]\nmax_boot_failures = 1\n'
        '[bridges.bad.settings]\nfail_boot = "no GPU here"\n'
    )
    cfg = write_config(tmp_path, text)
    code, out, err = run(capsys, "status", "--json", "--config", cfg)
    assert code == 1, err
    assert out, err
    doc = json.loads(out)
    assert doc["healthy"] is False
    assert doc["pools"]["echo"]["state"] == "ready"
    assert doc["pools"]["bad"]["state"] == "broken"
    assert "no GPU here" in doc["problems"]["bad"]


# --------------------------------------------------------------------------- doctor / list

BROKEN_ENV_TOML = """\
[bridges.echo]
python_module = "echo"

[bridges.needy]
python_module = "echo"
required_packages = ["mlbridge_surely_not_installed_pkg"]
required_env = ["CLI_TEST_SURELY_UNSET_TOKEN"]
"""


def test_doctor_healthy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    code, out, _ = run(capsys, "doctor", "--config", cfg)
    assert code == 0
    assert "ok   echo" in out
    assert out.rstrip().endswith("healthy")


def test_doctor_names_missing_package_and_env_var(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLI_TEST_SURELY_UNSET_TOKEN", raising=False)
    cfg = write_config(tmp_path, BROKEN_ENV_TOML)
    code, out, _ = run(capsys, "doctor", "--json", "--config", cfg)
    assert code == 1
    doc = json.loads(out)
    assert doc["healthy"] is False
    assert doc["bridges"]["echo"]["ok"] is True
    kinds = {(p["bridge"], p["kind"]) for p in doc["problems"]}
    assert kinds == {("needy", "package"), ("needy", "env")}
    text = " ".join(p["message"] + " " + p["fix"] for p in doc["problems"])
    assert "mlbridge_surely_not_installed_pkg" in text
    assert "pip install" in text
    assert "CLI_TEST_SURELY_UNSET_TOKEN" in text

    code, out, _ = run(capsys, "doctor", "--config", cfg)
    assert code == 1
    assert "FAIL needy" in out
    assert "mlbridge_surely_not_installed_pkg" in out
    assert "CLI_TEST_SURELY_UNSET_TOKEN" in out
    assert "2 problems found" in out

    monkeypatch.setenv("CLI_TEST_SURELY_UNSET_TOKEN", "set")
    _, out, _ = run(capsys, "doctor", "--json", "--config", cfg)
    assert {p["kind"] for p in json.loads(out)["problems"]} == {"package"}


def test_doctor_reports_config_errors_with_key_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, '[bridges.echo]\npython_module = "echo"\npool_sise = 2\n')
    code, out, _ = run(capsys, "doctor", "--json", "--config", cfg)
    assert code == 1
    (problem,) = json.loads(out)["problems"]
    assert problem["kind"] == "config"
    assert problem["key_path"] == "bridges.echo.pool_sise"
    assert "pool_size" in problem["message"]  # the suggestion

    code, out, _ = run(capsys, "doctor", "--config", cfg)
    assert code == 1
    assert "FAIL config at bridges.echo.pool_sise" in out


def test_doctor_reports_a_missing_interpreter(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = '[bridges.echo]\npython_module = "echo"\npython = "/nonexistent/bin/python3"\n'
    cfg = write_config(tmp_path, text)
    code, out, _ = run(capsys, "doctor", "--json", "--config", cfg)
    assert code == 1
    (problem,) = json.loads(out)["problems"]
    assert problem["kind"] == "interpreter"
    assert "/nonexistent/bin/python3" in problem["message"]


def test_list_shows_bridges_and_whether_installed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, BROKEN_ENV_TOML)
    code, out, _ = run(capsys, "list", "--json", "--config", cfg)
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["bridges"]}
    assert rows["echo"]["installed"] is True
    assert rows["echo"]["configured"] is True
    assert rows["needy"]["installed"] is False
    assert rows["needy"]["packages"] == ["mlbridge_surely_not_installed_pkg"]
    assert rows["needy"]["env_ok"] is False
    # Built-ins the config leaves out are still listed.
    assert rows["dspy"]["configured"] is False
    assert rows["dspy"]["packages"] == ["dspy"]

    code, out, _ = run(capsys, "list", "--config", cfg)
    assert code == 0
    needy = next(line for line in out.splitlines() if line.startswith("needy"))
    assert "no, env missing" in needy


# --------------------------------------------------------------------------- misc


def test_bench_runs_the_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        calls.append(argv)
        return 7

    suite = types.ModuleType("bench.__main__")
    suite.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench", types.ModuleType("bench"))
    monkeypatch.setitem(sys.modules, "bench.__main__", suite)
    assert cli.main(["bench", "--quick"]) == 7
    assert cli.main(["bench"]) == 7
    assert calls == [["--quick"], []]


def test_no_command_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2
    assert "call" in err
    assert "doctor" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2
    assert "invalid choice" in err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "exit codes" in out


# --------------------------------------------------------------------------- arrays in JSON
def test_call_prints_arrays_as_json_lists(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = Path(__file__).parent / "bridges" / "arrays_bridge.py"
    cfg = tmp_path / "mlbridge.toml"
    cfg.write_text(f'[bridges.arrays]\npython_script = "{script}"\n')
    code, out, err = run(capsys, "call", "arrays", "arrays", "--config", str(cfg))
    assert code == 0, err
    assert all("throw-away host" in line for line in err.splitlines())  # only the notice
    assert json.loads(out) == {
        "matrix": [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]],
        "ids": [3, 1, 2],
        "scalar": 1.5,
    }
    assert "array(" not in out


def test_call_msgpack_writes_arrays_as_the_wire_ext_type(tmp_path: Path) -> None:
    import msgpack
    import numpy as np

    from mlbridge._protocol.codec import MsgpackCodec

    script = Path(__file__).parent / "bridges" / "arrays_bridge.py"
    cfg = tmp_path / "mlbridge.toml"
    cfg.write_text(f'[bridges.arrays]\npython_script = "{script}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBRIDGE_")}
    env["MLBRIDGE_RUNTIME_DIR"] = str(tmp_path / "runtime")  # no running host here
    argv = [sys.executable, "-m", "mlbridge.cli", "call", "arrays", "arrays", "--config", str(cfg)]
    done = subprocess.run([*argv, "--msgpack"], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    raw = msgpack.unpackb(done.stdout, raw=False, ext_hook=msgpack.ExtType)
    assert raw["matrix"].code == 1 and raw["scalar"] == 1.5  # ext type 1: an array
    value = MsgpackCodec().decode(done.stdout)  # what the wire codec makes of it
    assert value["matrix"].dtype == np.float32 and value["matrix"].shape == (2, 3)
    assert value["matrix"].tolist() == [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]]
    assert value["ids"].tolist() == [3, 1, 2]
    streamed = subprocess.run(
        [*argv, "--msgpack", "--stream"], capture_output=True, text=True, env=env, timeout=120
    )
    assert streamed.returncode == 2 and "--msgpack writes one value" in streamed.stderr


def test_arrays_decoded_without_numpy_are_json_lists_too() -> None:
    import struct

    from mlbridge._protocol.codec import NDArrayPayload
    from mlbridge.cli._format import to_json

    payload = NDArrayPayload("<f4", (2, 2), struct.pack("<4f", 1.0, 2.0, 3.0, 4.5))
    assert json.loads(to_json({"x": payload})) == {"x": [[1.0, 2.0], [3.0, 4.5]]}
    odd = NDArrayPayload("<c8", (1,), b"\x00" * 8)  # complex: no list form, still no repr
    assert json.loads(to_json(odd))["dtype"] == "<c8"
