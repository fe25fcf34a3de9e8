"""``mlbridge serve`` as a process: refusals at start, readiness with a broken bridge, secrets
kept out of replies, and graceful shutdown on SIGTERM (drained, bounded, no worker left)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway_helpers import ROOT, alive, serving, start, stop, write_config
from mlbridge.gateway.runtime_file import read_running

pytestmark = pytest.mark.gateway

ECHO = """
[bridges.echo]
pool_size = 1
overflow = 1
[gateway]
shutdown_timeout = "2s"
"""


def _serve_rc(
    tmp: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cfg = write_config(tmp / "mlbridge.toml", "[bridges.echo]\n")
    full = {**os.environ, "MLBRIDGE_RUNTIME_DIR": str(tmp / "rt"), **(env or {})}
    full.pop("MLBRIDGE_TOKEN", None)
    full["PYTHONPATH"] = str(ROOT / "src")
    return subprocess.run(
        [sys.executable, "-m", "mlbridge.cli", "serve", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
    )


def test_non_loopback_bind_without_token_is_refused(tmp_path: Path) -> None:
    done = _serve_rc(tmp_path, "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 3, done.stderr
    assert "without a token" in done.stderr
    assert "MLBRIDGE_TOKEN" in done.stderr
    assert "listening" not in done.stdout
    assert not (tmp_path / "rt" / "gateway.json").exists()


def test_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = _serve_rc(tmp_path, "--port", str(port))
    assert done.returncode == 3, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "--port" in done.stderr


def test_readyz_reports_a_broken_bridge_and_secrets_stay_out(tmp_path: Path) -> None:
    toml = """
[bridges.echo]
pool_size = 1
[bridges.echo.options]
lazy = false
[bridges.echo.env]
OPENAI_API_KEY = "sk-very-secret-4242"
[bridges.bad]
python_module = "echo"
[bridges.bad.options]
lazy = false
max_boot_failures = 2
restart_backoff = 0.05
[bridges.bad.settings]
fail_boot = "the model file is missing"
"""
    with serving(tmp_path, toml) as gw, gw.client() as c:
        deadline = time.monotonic() + 60
        r = c.get("/readyz")
        while r.status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
            r = c.get("/readyz")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["ready"] is False
        assert "the model file is missing" in body["broken"]["bad"]
        assert body["pools"]["echo"]["state"] == "ready"
        # the healthy bridge still serves
        ok = c.post("/api/frameworks/echo/execute", json={"command": "echo", "args": {"a": 1}})
        assert ok.json() == {"result": {"a": 1}}
        r = c.post("/api/frameworks/bad/execute", json={"command": "echo"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "bridge_broken"
        # a secret from the config never comes back in an error, the stats or the log
        r = c.post(
            "/api/frameworks/echo/execute",
            json={"command": "fail", "args": {"message": "key sk-very-secret-4242 rejected"}},
        )
        assert 400 <= r.status_code < 600
        assert "sk-very-secret-4242" not in r.text
        assert "***" in r.json()["error"]["message"]
        assert "sk-very-secret-4242" not in c.get("/api/stats").text
        assert "sk-very-secret-4242" not in gw.stderr()


def test_run_time_file_while_serving_and_cors_when_asked(tmp_path: Path) -> None:
    with serving(tmp_path, ECHO, args=("--cors-origin", "http://app.test")) as gw:
        running = read_running({"MLBRIDGE_RUNTIME_DIR": str(gw.runtime_dir)})
        assert running is not None
        assert running.url == gw.url
        assert running.pid == gw.proc.pid
        assert running.token_required is False
        preflight = {"Access-Control-Request-Method": "POST"}
        r = httpx.options(gw.url + "/api/stats", headers={"Origin": "http://app.test", **preflight})
        assert r.headers["access-control-allow-origin"] == "http://app.test"
        r = httpx.get(gw.url + "/healthz", headers={"Origin": "http://app.test"})
        assert r.headers["access-control-allow-origin"] == "http://app.test"
        r = httpx.get(gw.url + "/healthz", headers={"Origin": "http://other.test"})
        assert "access-control-allow-origin" not in r.headers
    assert read_running({"MLBRIDGE_RUNTIME_DIR": str(gw.runtime_dir)}) is None


def _in_flight(url: str, body: dict[str, Any], out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            out["response"] = httpx.post(
                url + "/api/frameworks/echo/execute", json=body, timeout=90
            )
        except httpx.HTTPError as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_busy(url: str) -> set[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pools = httpx.get(url + "/api/stats", timeout=30).json()["pools"]
        workers = pools["echo"]["workers"]
        if any(w["busy"] for w in workers):
            return {w["pid"] for w in workers}
        time.sleep(0.05)
    raise AssertionError("the request never reached a worker")


def test_sigterm_drains_in_flight_requests_then_stops_every_worker(tmp_path: Path) -> None:
    gw = start(tmp_path, ECHO)
    out: dict[str, Any] = {}
    t = _in_flight(gw.url, {"command": "sleep", "args": {"seconds": 1.5}}, out)
    gw.worker_pids |= _wait_busy(gw.url)
    gw.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert "response" in out, out
    assert out["response"].status_code == 200
    rc = stop(gw)  # also checks: no worker alive, no run-time file left
    assert rc == 0, gw.stderr()[-3000:]


def test_sigterm_drain_is_bounded(tmp_path: Path) -> None:
    gw = start(tmp_path, ECHO)
    out: dict[str, Any] = {}
    t = _in_flight(gw.url, {"command": "busy", "args": {"seconds": 120}, "timeout": 300}, out)
    gw.worker_pids |= _wait_busy(gw.url)
    t0 = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    rc = stop(gw, timeout=90)
    took = time.monotonic() - t0
    t.join(30)
    assert rc == 0, gw.stderr()[-3000:]
    assert took < 60, took  # shutdown_timeout 2 s plus the pool's TERM/KILL, not the 120 s call
    assert "response" not in out or out["response"].status_code >= 500
    assert not any(alive(p) for p in gw.worker_pids)
