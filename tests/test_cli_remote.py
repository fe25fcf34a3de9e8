"""``mlbridge call`` / ``mlbridge status`` against a real running ``mlbridge serve`` (issue 10,
defect 5): found through its run-time file, ``--url`` or ``$MLBRIDGE_URL``, with the token from
``$MLBRIDGE_TOKEN``; and saying so when they start a throw-away host instead.

The server is a real ``mlbridge serve`` subprocess on 127.0.0.1 (port 0) with a private runtime
directory; the commands run in-process through ``cli.main``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlbridge import cli

pytestmark = pytest.mark.gateway

ECHO_TOML = """\
default_bridge = "echo"

[bridges.echo]
python_module = "echo"
"""
SECRET = "remote-test-token-7f3a9c"


@dataclass
class Served:
    url: str
    runtime_dir: Path
    proc: subprocess.Popen[str]


def _serve(tmp: Path, token: str | None = None, toml: str = ECHO_TOML) -> Iterator[Served]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "mlbridge.toml").write_text(toml)
    runtime = tmp / "runtime"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBRIDGE_")}
    env["MLBRIDGE_RUNTIME_DIR"] = str(runtime)
    if token:
        env["MLBRIDGE_TOKEN"] = token
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbridge.cli", "serve", "--port", "0", "--config", "mlbridge.toml"],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    found: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"listening on (http://\S+)", line)
            if m and not found:
                found.append(m.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert found, "mlbridge serve did not announce its URL"
        deadline = time.monotonic() + 30
        while not (runtime / "gateway.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield Served(found[0], runtime, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def served_with_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve(tmp_path_factory.mktemp("served_token"), token=SECRET)


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("MLBRIDGE_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("MLBRIDGE_RUNTIME_DIR", str(tmp_path / "no-server-here"))
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _requests(capsys: pytest.CaptureFixture[str], *extra: str) -> int:
    code, out, err = run(capsys, "status", "--json", *extra)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["host"]["kind"] == "running"
    return int(doc["pools"]["echo"]["requests"])


def test_status_shows_the_running_hosts_real_request_counts(
    served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLBRIDGE_RUNTIME_DIR", str(served.runtime_dir))  # found via its file
    before = _requests(capsys)
    pids = set()
    for i in range(5):
        code, out, err = run(capsys, "call", "echo", "echo", json.dumps({"i": i}))
        assert code == 0, err
        assert json.loads(out) == {"i": i}
        assert "throw-away" not in err
        code, out, _ = run(capsys, "call", "echo", "pid")
        pids.add(json.loads(out))
    assert len(pids) == 1  # the same warm worker every time: one host, not one per command
    assert _requests(capsys) == before + 10

    code, out, err = run(capsys, "status")
    assert code == 0, err
    assert f"host: running at {served.url}" in out
    assert "run-time file" in out
    assert f"requests {before + 10}" in out
    assert "throw-away" not in out + err


def test_call_streams_through_the_running_host(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "call", "echo", "stream", '{"n": 3}', "--stream", "--final", "--url", served.url
    )
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [{"index": 0}, {"index": 1}, {"index": 2}, {"chunks": 3, "done": True}]


def test_url_and_env_url_reach_the_host_and_errors_keep_their_exit_codes(
    served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _requests(capsys, "--url", served.url)
    monkeypatch.setenv("MLBRIDGE_URL", served.url + "/")
    code, out, err = run(capsys, "call", "echo", "echo", '{"via": "env"}')
    assert code == 0, err
    assert json.loads(out) == {"via": "env"}
    assert _requests(capsys) == before + 1
    code, _, err = run(capsys, "call", "nosuchbridge", "echo")
    assert code == 4 and "nosuchbridge" in err
    code, _, err = run(capsys, "call", "echo", "nosuchcommand")
    assert code == 5 and "nosuchcommand" in err
    code, _, err = run(capsys, "status", "--bridge", "nosuchbridge")
    assert code == 4 and "nosuchbridge" in err


def test_token_comes_from_the_environment_and_is_never_printed(
    served_with_token: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = served_with_token.url
    code, _, err = run(capsys, "call", "echo", "echo", "{}", "--url", url)
    assert code == 8
    assert "MLBRIDGE_TOKEN" in err and "401" in err
    monkeypatch.setenv("MLBRIDGE_TOKEN", SECRET)
    code, out, err = run(capsys, "call", "echo", "echo", '{"ok": 1}', "--url", url)
    assert code == 0, err
    assert json.loads(out) == {"ok": 1}
    code, out, err = run(capsys, "status", "--json", "--url", url)
    assert code == 0, err
    assert json.loads(out)["pools"]["echo"]["requests"] >= 1
    assert SECRET not in out + err


def test_unreachable_url_is_an_error_naming_the_fix(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run(capsys, "status", "--url", f"http://127.0.0.1:{port}")
    assert code == 8
    assert f"cannot reach the mlbridge host at http://127.0.0.1:{port}" in err
    assert "mlbridge serve" in err
    code, _, err = run(capsys, "call", "echo", "echo", "--url", "localhost:8765")
    assert code == 2 and "base URL" in err


def test_without_a_running_host_commands_say_they_start_a_throw_away_host(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "mlbridge.toml").write_text(ECHO_TOML)
    code, out, err = run(capsys, "call", "echo", "echo", '{"a": 1}')
    assert code == 0, err
    assert json.loads(out) == {"a": 1}
    assert "throw-away host" in err
    code, out, err = run(capsys, "status", "--json")
    assert code == 0, err
    assert json.loads(out)["host"] == {"kind": "throw-away"}
    assert "throw-away host" in err
    code, out, _ = run(capsys, "status")
    assert "host: throw-away" in out


def test_a_stale_runtime_file_is_ignored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run-time file left by a server that is gone (its pid has exited) is not used."""
    from mlbridge.gateway.runtime_file import write_running

    runtime = tmp_path / "stale-runtime"
    monkeypatch.setenv("MLBRIDGE_RUNTIME_DIR", str(runtime))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert write_running("http://127.0.0.1:9", token_required=False, pid=dead.pid)
    (tmp_path / "mlbridge.toml").write_text(ECHO_TOML)
    code, out, err = run(capsys, "call", "echo", "echo", '{"a": 2}')
    assert code == 0, err
    assert json.loads(out) == {"a": 2}
    assert "throw-away host" in err


FLAKY_BROKEN = 'raise RuntimeError("the model file is missing")\n'
FLAKY_FIXED = """\
from typing import Any

from mlbridge.bridges.base import BaseBridge


class FlakyBridge(BaseBridge):
    name = "flaky"

    def _register_handlers(self) -> None:
        self.register_handler("greet", self._greet)

    def _greet(self, args: dict[str, Any]) -> str:
        return "fixed"
"""


def test_restart_brings_back_a_bridge_broken_at_boot_in_the_running_host(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = tmp_path_factory.mktemp("served_flaky")
    script = tmp / "flaky.py"
    script.write_text(FLAKY_BROKEN)
    toml = ECHO_TOML + (
        '\n[bridges.flaky]\npython_script = "flaky.py"\n'
        "[bridges.flaky.options]\nmax_boot_failures = 1\nlazy = true\n"
    )
    for served in _serve(tmp, toml=toml):
        code, _, err = run(capsys, "call", "flaky", "greet", "--url", served.url)
        assert code == 8, err
        assert "the model file is missing" in err
        assert "mlbridge restart flaky" in err  # the CLI's way to do it, named in the fix
        code, _, err = run(capsys, "call", "flaky", "greet", "--url", served.url)
        assert code == 8  # still broken: nothing restarts it by itself
        script.write_text(FLAKY_FIXED)
        code, out, err = run(capsys, "restart", "flaky", "--json", "--url", served.url)
        assert code == 0, err
        assert json.loads(out) == {"framework": "flaky", "restarted": True, "state": "ready"}
        code, out, err = run(capsys, "call", "flaky", "greet", "--url", served.url)
        assert code == 0, err
        assert json.loads(out) == "fixed"
        code, _, err = run(capsys, "restart", "nosuchbridge", "--url", served.url)
        assert code == 4 and "nosuchbridge" in err


def test_restart_without_a_running_host_says_there_is_nothing_to_restart(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "restart", "echo")
    assert code == 2
    assert "no running host" in err and "--url" in err


def test_call_msgpack_through_the_running_host(served: Served) -> None:
    import msgpack

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBRIDGE_")}
    args = ["call", "echo", "echo", '{"a": [1, 2], "b": "x"}', "--msgpack", "--url", served.url]
    done = subprocess.run(
        [sys.executable, "-m", "mlbridge.cli", *args],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert b"throw-away" not in done.stderr
    assert msgpack.unpackb(done.stdout, raw=False) == {"a": [1, 2], "b": "x"}
