"""How a worker process ended, in words, and what it said on stderr on the way."""

from __future__ import annotations

import json
import signal
from collections import deque
from dataclasses import dataclass
from typing import Any

from .._protocol.exit_codes import BOOT_ERROR_MARKER, DESCRIPTIONS
from ..errors import ResourceLimitError, WorkerCrashedError

__all__ = ["ExitInfo", "StderrTail", "crash_error"]

_SIGNAL_CAUSES: dict[int, str] = {
    signal.SIGKILL: "killed (out of memory, or killed by a supervisor or a user)",
    signal.SIGSEGV: "crashed in native code (segmentation fault)",
    signal.SIGABRT: "aborted (a native library called abort())",
    signal.SIGBUS: "crashed in native code (bus error)",
    signal.SIGTERM: "terminated",
}


@dataclass(frozen=True, slots=True)
class ExitInfo:
    returncode: int | None
    stderr_tail: str
    boot_error: dict[str, Any] | None
    #: why the host itself signalled the worker, when it did (then no cause is guessed)
    kill_reason: str | None = None
    #: the OS-enforced limit that stopped it ("max_memory=512MB"), when the backend knows one
    limit: str | None = None

    def describe(self) -> str:
        rc = self.returncode
        if rc is None:
            return "is still running"
        if self.limit and not self.kill_reason:
            return f"was stopped by the kernel (exit {rc}): it hit the bridge's limit {self.limit}"
        if self.kill_reason and rc in (-signal.SIGKILL, -signal.SIGTERM):
            name = signal.Signals(-rc).name
            return f"was stopped by mlbridge ({name}) because {self.kill_reason}"
        if rc < 0:
            sig = -rc
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            cause = _SIGNAL_CAUSES.get(sig, "")
            return f"was killed by {name} (exit {rc})" + (f": likely {cause}" if cause else "")
        desc = DESCRIPTIONS.get(rc)
        return f"exited with code {rc}" + (f" ({desc})" if desc else "")


def crash_error(
    bridge: str,
    worker_id: str,
    pid: int | None,
    during: str,
    *,
    closing_reason: str | None,
    limit_cause: dict[str, Any] | None,
    info: ExitInfo,
    stderr_tail: str,
) -> WorkerCrashedError:
    """The error of a call in flight when its worker ended: the host closing it, a limit the
    kernel enforced (:class:`ResourceLimitError`), or the exit in words with the stderr tail."""
    who = f"worker {worker_id} of {bridge!r}"
    if closing_reason is not None:
        return WorkerCrashedError(
            f"{who} was stopped during {during} because {closing_reason} (close() was called "
            "while the call was in flight); close the bridge only after its calls have returned",
            exit_code=info.returncode,
            worker_id=worker_id,
            pid=pid,
        )
    if limit_cause:
        limit, value = limit_cause["limit"], limit_cause["value"]
        return ResourceLimitError(
            f"{who} was stopped by the kernel during {during}: it hit the bridge's {limit} "
            f"limit ({limit}={value}); the pool replaces it. Fix: {limit_cause['fix']}",
            exit_code=info.returncode,
            worker_id=worker_id,
            pid=pid,
            **limit_cause,
        )
    msg = f"{who} {info.describe()} during {during}"
    if info.boot_error:
        msg += f"; boot error: {info.boot_error.get('error')}"
    if info.stderr_tail:
        msg += f"\n--- worker stderr (last lines) ---\n{stderr_tail}"
    return WorkerCrashedError(msg, exit_code=info.returncode, worker_id=worker_id, pid=pid)


class StderrTail:
    """A worker's stderr: split into lines, the boot-error marker parsed out, the last lines
    kept for crash messages (a worker must never block on a full stderr pipe, so the host
    drains it continuously)."""

    def __init__(self, on_line: Any = None, lines: int = 40) -> None:
        self.lines: deque[str] = deque(maxlen=lines)
        self.boot_error: dict[str, Any] | None = None
        self._buf = bytearray()
        self._on_line = on_line

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > 65536:
                    self.flush()
                return
            line = buf[:nl].decode(errors="replace")
            del buf[: nl + 1]
            self._line(line)

    def flush(self) -> None:
        if self._buf:
            self._line(self._buf.decode(errors="replace"))
            self._buf.clear()

    def _line(self, line: str) -> None:
        if line.startswith(BOOT_ERROR_MARKER):
            try:
                self.boot_error = json.loads(line[len(BOOT_ERROR_MARKER) :])
            except ValueError:
                self.boot_error = {"error": line}
            return
        self.lines.append(line)
        if self._on_line is not None:
            self._on_line(line)

    def tail(self, n: int) -> str:
        return "\n".join(list(self.lines)[-n:])
