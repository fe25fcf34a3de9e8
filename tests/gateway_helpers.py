"""Start a real ``mlbridge serve`` subprocess for the gateway tests, and stop it cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BRIDGES = Path(__file__).resolve().parent / "bridges"
START_TIMEOUT = 120.0


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen[str]
    stderr_path: Path
    runtime_dir: Path
    token: str | None = None
    worker_pids: set[int] = field(default_factory=set)

    def client(self, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(kw.pop("headers", {}))
        return httpx.Client(base_url=self.url, headers=headers, timeout=60.0, **kw)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def remember_workers(self) -> set[int]:
        """The pids of every worker now alive (to check later that none is left)."""
        with self.client() as c:
            stats = c.get("/api/stats").json()
        for pool in stats["pools"].values():
            self.worker_pids.update(w["pid"] for w in pool["workers"] if w["pid"])
        return set(self.worker_pids)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def write_config(path: Path, toml: str) -> Path:
    path.write_text(toml.replace("@BRIDGES@", str(BRIDGES)))
    return path


def start(
    tmp: Path,
    toml: str,
    *,
    token: str | None = None,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Gateway:
    cfg = write_config(tmp / "mlbridge.toml", toml)
    runtime = tmp / "runtime"
    full_env = {**os.environ, "MLBRIDGE_RUNTIME_DIR": str(runtime), **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p
    )
    full_env.pop("MLBRIDGE_TOKEN", None)
    if token is not None:
        full_env["MLBRIDGE_TOKEN"] = token
    err = tmp / "serve.stderr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlbridge.cli", "serve", "--config", str(cfg), "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=err.open("w"),
        text=True,
        env=full_env,
        cwd=tmp,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line or proc.poll() is not None:
            break
    if "listening on" not in line:
        stop_proc(proc)
        raise AssertionError(f"mlbridge serve did not start: {line!r}\n{err.read_text()}")
    url = line.split("listening on ", 1)[1].split()[0]
    gw = Gateway(url, proc, err, runtime, token)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:  # readiness: /healthz answers
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                break
        time.sleep(0.1)
    return gw


def stop_proc(proc: subprocess.Popen[str], timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def stop(gw: Gateway, timeout: float = 60.0) -> int:
    """SIGTERM, wait; then check that no worker and no run-time file is left behind."""
    rc = stop_proc(gw.proc, timeout)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in gw.worker_pids):
        time.sleep(0.1)
    left = [p for p in gw.worker_pids if alive(p)]
    for p in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    assert not left, f"workers left behind after shutdown: {left}"
    assert not (gw.runtime_dir / "gateway.json").exists(), "run-time file left behind"
    return rc


@contextlib.contextmanager
def serving(tmp: Path, toml: str, **kw: Any) -> Iterator[Gateway]:
    gw = start(tmp, toml, **kw)
    try:
        yield gw
    finally:
        with contextlib.suppress(Exception):
            gw.remember_workers()
        stop(gw)


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, Any]]:
    """(event name, decoded data) per Server-Sent Event (``[DONE]`` as the string)."""
    name: str | None = None
    data: list[str] = []
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            text = "\n".join(data)
            yield name, text if text == "[DONE]" else json.loads(text)
            name, data = None, []
