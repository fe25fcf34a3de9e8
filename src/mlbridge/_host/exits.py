"""How a worker process ended, in words, and how much of its input it never read."""

from __future__ import annotations

import signal
import struct
from dataclasses import dataclass
from typing import Any

from .._protocol.exit_codes import DESCRIPTIONS

__all__ = ["ExitInfo", "unread_bytes"]

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

    def describe(self) -> str:
        rc = self.returncode
        if rc is None:
            return "is still running"
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


def unread_bytes(fd: int) -> int:
    """Bytes still waiting in a pipe (FIONREAD works on either end on Linux); 0 if unknown."""
    if fd < 0:
        return 0
    try:
        import fcntl
        import termios

        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except (OSError, ImportError):
        return 0
