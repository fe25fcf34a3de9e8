"""Leftover workers of an earlier host: record every worker, reap orphans at start.

Workers already die with their host: their input pipe closes (they exit 0 within a second) and
Linux's PR_SET_PDEATHSIG kills them even when the host was SIGKILLed. This is the third line:
each live worker has a file ``<runtime_dir>/<worker_pid>`` holding ``<host_pid> <host_start>``.
A host starting up kills (by process group) every recorded worker whose host is gone and whose
command line is still an mlbridge worker, then removes the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
from pathlib import Path

__all__ = ["PidRegistry"]

log = logging.getLogger("mlbridge.host")


def _default_dir() -> Path:
    base = os.environ.get("MLBRIDGE_RUNTIME_DIR")
    if base:
        return Path(base)
    return Path(tempfile.gettempdir()) / f"mlbridge-{os.getuid()}" / "workers"


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"mlbridge.worker" in f.read()
    except OSError:
        return False


class PidRegistry:
    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or _default_dir()
        self.host_pid = os.getpid()
        self.host_start = _process_start(self.host_pid) or "0"
        self.enabled = True
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning(
                "cannot use %s for worker pid files (%s); orphan reaping is off", self.dir, exc
            )
            self.enabled = False

    def register(self, pid: int) -> None:
        if self.enabled:
            with contextlib.suppress(OSError):
                (self.dir / str(pid)).write_text(f"{self.host_pid} {self.host_start}\n")

    def unregister(self, pid: int) -> None:
        if self.enabled:
            with contextlib.suppress(OSError):
                (self.dir / str(pid)).unlink()

    def reap(self) -> list[int]:
        """Kill workers left by hosts that no longer run; return their pids."""
        if not self.enabled:
            return []
        reaped: list[int] = []
        for entry in self.dir.iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                host_pid_s, host_start = entry.read_text().split()
                host_pid = int(host_pid_s)
            except (OSError, ValueError):
                host_pid, host_start = -1, ""
            if host_pid > 0 and _process_start(host_pid) == host_start:
                continue  # its host still runs
            if _is_worker(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                reaped.append(pid)
                log.warning("reaped leftover worker pid %d of dead host %d", pid, host_pid)
            with contextlib.suppress(OSError):
                entry.unlink()
        return reaped
