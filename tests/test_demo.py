"""`make demo` runs the tour; its echo part is checked here (the model part has its own tests)."""

from __future__ import annotations

import subprocess
import sys


def test_demo_echo_tour_runs_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mlbridge.demo", "--no-models"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "execute('echo', 'echo', {'hello': 'world'}) -> {'hello': 'world'}" in text
    assert "the pool replaced it: value 43" in text
    assert "CallTimeoutError" in text
    assert "all workers stopped" in text
