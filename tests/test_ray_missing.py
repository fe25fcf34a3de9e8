"""Without Ray installed, a ``backend = "ray"`` bridge fails to start with the fix in its error
(run in a subprocess whose ``import ray`` fails, so it holds whether or not Ray is installed)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["ray"] = None  # import ray -> ImportError, as without the extra
    from mlbridge import MLBridge, errors
    from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig
    cfg = BridgeConfig(
        "echo", python_module="echo",
        options=BridgeOptions(backend="ray", max_boot_failures=1, startup_timeout=20),
    )
    with MLBridge(MLBridgeConfig(bridges={"echo": cfg})) as b:
        try:
            b.execute("echo", "echo", {"a": 1})
        except errors.MLBridgeError as exc:
            print("ERROR", type(exc).__name__, exc)
        assert b.execute.__name__  # the host itself still works
    """
)


def test_ray_backend_without_ray_names_the_fix() -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ERROR"))
    assert "pip install 'mlbridge[ray]'" in line
    assert "BridgeBrokenError" in line or "BridgeUnavailableError" in line, line
