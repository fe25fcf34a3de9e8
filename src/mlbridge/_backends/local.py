"""The ``local`` backend: each worker is a subprocess of the host, in its own session.

Its own session (process group) keeps terminal signals away from workers and lets the host kill a
worker together with anything it forked. The exit is watched through a pidfd (Linux 5.3+); on
older kernels the host polls. Pipes are non-blocking and grown to 1 MiB to cut wake-ups for large
payloads.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Mapping, Sequence

__all__ = ["LocalBackend", "LocalHandle"]

PIPE_BYTES = 1 << 20


class LocalHandle:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.pid = proc.pid
        self.stdin_fd = proc.stdin.fileno()
        self.stdout_fd = proc.stdout.fileno()
        self.stderr_fd = proc.stderr.fileno()
        for fd in (self.stdin_fd, self.stdout_fd, self.stderr_fd):
            os.set_blocking(fd, False)
        _grow_pipe(self.stdin_fd)
        _grow_pipe(self.stdout_fd)
        try:
            self.exit_fd = os.pidfd_open(proc.pid)
        except (OSError, AttributeError):
            self.exit_fd = -1

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc.returncode is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def release(self) -> None:
        self.close_stdin()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        if self.exit_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.exit_fd)
            self.exit_fd = -1


class LocalBackend:
    name = "local"

    def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> LocalHandle:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
            bufsize=0,
        )
        return LocalHandle(proc)


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (OSError, ValueError):
        pass
