"""Helpers shared by the tests that drive real worker processes (``tests/test_worker_*.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlbridge.testing import WorkerProcess

CLEANUP_BRIDGE = '''
"""A user bridge loaded by path: its cleanup callback leaves a marker file."""
from pathlib import Path

from mlbridge.bridges.base import BaseBridge


class MarkerBridge(BaseBridge):
    name = "marker"

    def _initialize_framework(self):
        self.marker = Path(self.settings["marker"])

    def _register_handlers(self):
        self.register_handler("hi", lambda a: {"hi": a.get("who", "you")})
        self.on_cleanup(self._write_marker)

    def _write_marker(self):
        with self.marker.open("a") as f:
            f.write("cleaned\\n")

    def get_framework_info(self):
        return {"name": "marker", "version": "0.0"}
'''


class Spawner:
    """Starts workers for one test and makes sure every one of them is gone afterwards."""

    def __init__(self) -> None:
        self.workers: list[WorkerProcess] = []

    def __call__(self, bridge: str = "echo", *args: str, **kwargs: Any) -> WorkerProcess:
        w = WorkerProcess(bridge, *args, **kwargs)
        self.workers.append(w)
        return w

    def close_all(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                try:
                    os.killpg(w.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            w.close()
            try:
                w.proc.wait(5)
            except subprocess.TimeoutExpired:
                w.proc.kill()


def write_cleanup_bridge(tmp_path: Path) -> tuple[Path, Path]:
    """The marker bridge as ``tmp_path/marker_bridge.py``; returns (script, marker file)."""
    script = tmp_path / "marker_bridge.py"
    script.write_text(CLEANUP_BRIDGE)
    return script, tmp_path / "cleaned.txt"


def recv_many(w: WorkerProcess, n: int, timeout: float = 10.0) -> list[Any]:
    return [w.recv(timeout) for _ in range(n)]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.01)


def wait_busy(w: WorkerProcess, command: str, rid: int = 900_000) -> None:
    """Poll ``heartbeat`` until the main thread runs ``command`` (ids from ``rid`` up)."""
    for i in range(500):
        w.send({"id": rid + i, "command": "heartbeat"})
        reply = w.recv(5)
        assert reply["id"] == rid + i, reply
        if reply["result"]["current_command"] == command:
            return
        time.sleep(0.01)
    raise AssertionError(f"the worker never started {command!r}")


def drain_until_reply(w: WorkerProcess, rid: int, timeout: float) -> tuple[list[Any], Any]:
    """The chunks of call ``rid``, then its final reply (other ids, e.g. a cancel's, skipped)."""
    chunks: list[Any] = []
    deadline = time.monotonic() + timeout
    while True:
        frame = w.recv(max(0.1, deadline - time.monotonic()))
        if frame.get("id") != rid:
            continue  # the cancel's own reply
        if "chunk" in frame:
            chunks.append(frame["chunk"])
            continue
        return chunks, frame
