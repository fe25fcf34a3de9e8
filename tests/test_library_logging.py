"""The library logs through "mlbridge.*" but never prints unless the application asks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

# Kill a worker with SIGKILL, wait for its replacement, call again: the host logs a WARNING.
SCRIPT = textwrap.dedent(
    """
    import logging, os, signal, sys, time
    if sys.argv[1] == "configured":
        logging.basicConfig(level=logging.WARNING, format="LOGGED %(levelname)s %(message)s")
    from mlbridge import MLBridge
    from mlbridge.config import BridgeConfig, MLBridgeConfig

    cfg = MLBridgeConfig(bridges={"echo": BridgeConfig("echo", python_module="echo")})
    with MLBridge(cfg) as b:
        b.execute("echo", "ping")
        pid = b.statistics()["pools"]["echo"]["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = b.statistics()["pools"]["echo"]["workers"]
            if workers and workers[0]["pid"] != pid:
                break
            time.sleep(0.05)
        assert b.execute("echo", "echo", {"a": 1}) == {"a": 1}
    print("done", flush=True)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=90,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLBRIDGE_")},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "done\n"
    return out


def test_a_worker_kill_prints_nothing_when_the_application_configured_no_logging() -> None:
    out = _run("bare")
    # Before the NullHandler, logging's last-resort handler printed the bare message here.
    assert "SIGKILL" not in out.stderr and "killed" not in out.stderr, out.stderr
    assert out.stderr == ""


def test_the_same_kill_is_logged_when_the_application_configures_logging() -> None:
    out = _run("configured")
    assert "LOGGED WARNING" in out.stderr and "SIGKILL" in out.stderr, out.stderr


def test_the_package_logger_has_a_null_handler() -> None:
    import mlbridge

    assert mlbridge.__name__ == "mlbridge"
    handlers = logging.getLogger("mlbridge").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
