"""The run-time file of ``mlbridge serve``: written atomically, read back, stale ones ignored."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mlbridge.gateway.runtime_file import (
    RUNTIME_FILE,
    read_running,
    remove_running,
    runtime_file_path,
    write_running,
)

pytestmark = pytest.mark.gateway


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"MLBRIDGE_RUNTIME_DIR": str(tmp_path / "rt")}


def test_write_read_remove(env: dict[str, str]) -> None:
    path = write_running("http://127.0.0.1:9/", token_required=True, environ=env)
    assert path is not None
    assert path == runtime_file_path(env)
    assert os.path.basename(path) == RUNTIME_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(Path(path).read_text())
    assert set(data) == {"version", "url", "pid", "token_required", "started"}
    running = read_running(env)
    assert running is not None
    assert running.url == "http://127.0.0.1:9"
    assert running.pid == os.getpid()
    assert running.token_required is True
    assert remove_running(os.getpid() + 1, environ=env) is False  # not ours: left alone
    assert read_running(env) is not None
    assert remove_running(environ=env) is True
    assert read_running(env) is None
    assert not os.path.exists(path)


def test_stale_and_malformed_files_are_ignored(env: dict[str, str]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = write_running("http://127.0.0.1:9", token_required=False, pid=dead.pid, environ=env)
    assert path is not None
    assert read_running(env) is None  # its process has exited
    Path(path).write_text("{not json")
    assert read_running(env) is None
    Path(path).write_text(json.dumps({"version": 1, "url": "ftp://x", "pid": 1}))
    assert read_running(env) is None


def test_no_usable_runtime_dir(tmp_path: Path) -> None:
    bad = tmp_path / "open"
    bad.mkdir(mode=0o777)
    bad.chmod(0o777)  # writable by others: refused
    env = {"MLBRIDGE_RUNTIME_DIR": str(bad)}
    assert write_running("http://127.0.0.1:9", token_required=False, environ=env) is None
    assert read_running(env) is None
