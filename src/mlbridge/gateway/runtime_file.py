"""The run-time file through which other CLI commands find a running ``mlbridge serve``.

While ``mlbridge serve`` is up it keeps ``<runtime dir>/gateway.json`` (:data:`RUNTIME_FILE`,
in the private directory of :mod:`mlbridge._host.runtime_dir`: ``$MLBRIDGE_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/mlbridge``, else ``<tempdir>/mlbridge-<uid>``). Its JSON shape, version 1::

    {"version": 1, "url": "http://127.0.0.1:8765", "pid": 12345,
     "token_required": true, "started": 1764633600.0}

- ``url``: the gateway's base URL (no trailing slash); routes such as ``/v1/models`` hang off it.
- ``pid``: the serving process; a file whose process is gone is stale and ignored.
- ``token_required``: whether routes other than ``/healthz`` and ``/readyz`` need
  ``Authorization: Bearer <token>``. The token itself is never written here: a client reads it
  from ``MLBRIDGE_TOKEN`` (or its own ``--token``).

Use :func:`read_running` to find a running gateway (None when there is none), and
:func:`write_running` / :func:`remove_running` from the serving process. The file is written
atomically (temporary file, then rename) with mode 0600 through the checked directory's
descriptor, and removed on exit only while it still names this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from mlbridge._host.runtime_dir import RuntimeDir, open_runtime_dir

__all__ = [
    "RUNTIME_FILE",
    "RunningGateway",
    "read_running",
    "remove_running",
    "runtime_file_path",
    "write_running",
]

RUNTIME_FILE = "gateway.json"
"""The file's name inside the runtime directory."""

_VERSION = 1
_MAX_BYTES = 4096


@dataclass(frozen=True, slots=True)
class RunningGateway:
    """What the run-time file says about a running gateway (never the token)."""

    url: str
    pid: int
    token_required: bool
    started: float

    def to_json(self) -> dict[str, object]:
        return {
            "version": _VERSION,
            "url": self.url,
            "pid": self.pid,
            "token_required": self.token_required,
            "started": self.started,
        }


def _open_dir(environ: Mapping[str, str] | None) -> RuntimeDir | None:
    return open_runtime_dir(environ)


def runtime_file_path(environ: Mapping[str, str] | None = None) -> str | None:
    """Where the run-time file lives (None when no private runtime directory is usable)."""
    d = _open_dir(environ)
    if d is None:
        return None
    try:
        return os.path.join(d.path, RUNTIME_FILE)
    finally:
        d.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process now holds the number: not ours, but alive
    try:  # a zombie has exited already
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _parse(raw: bytes) -> RunningGateway | None:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != _VERSION:
        return None
    url, pid, token_required = data.get("url"), data.get("pid"), data.get("token_required")
    started = data.get("started", 0.0)
    if (
        not isinstance(url, str)
        or not url.startswith(("http://", "https://"))
        or not isinstance(pid, int)
        or isinstance(pid, bool)
        or pid <= 0
        or not isinstance(token_required, bool)
        or not isinstance(started, int | float)
    ):
        return None
    return RunningGateway(url.rstrip("/"), pid, token_required, float(started))


def read_running(environ: Mapping[str, str] | None = None) -> RunningGateway | None:
    """The gateway this user is running now, or None (no file, a malformed one, or its process
    has exited). ``environ`` defaults to this process's environment (it picks the directory)."""
    d = _open_dir(environ)
    if d is None:
        return None
    try:
        try:
            fd = os.open(RUNTIME_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_size > _MAX_BYTES:
                return None
            raw = os.read(fd, _MAX_BYTES)
        finally:
            os.close(fd)
    finally:
        d.close()
    running = _parse(raw)
    if running is None or not _pid_alive(running.pid):
        return None
    return running


def write_running(
    url: str,
    *,
    token_required: bool,
    pid: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """Write the run-time file for this process; returns its path (None when no runtime
    directory is usable: the gateway still serves, other commands just need ``--url``)."""
    info = RunningGateway(
        url.rstrip("/"), os.getpid() if pid is None else pid, token_required, time.time()
    )
    d = _open_dir(environ)
    if d is None:
        return None
    tmp = f".{RUNTIME_FILE}.{info.pid}.tmp"
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=d.fd)
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=d.fd,
        )
        try:
            os.write(fd, json.dumps(info.to_json()).encode())
        finally:
            os.close(fd)
        os.rename(tmp, RUNTIME_FILE, src_dir_fd=d.fd, dst_dir_fd=d.fd)
        return os.path.join(d.path, RUNTIME_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=d.fd)
        return None
    finally:
        d.close()


def remove_running(pid: int | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Remove the run-time file if it names ``pid`` (default: this process); True if removed."""
    pid = os.getpid() if pid is None else pid
    d = _open_dir(environ)
    if d is None:
        return False
    try:
        try:
            fd = os.open(RUNTIME_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
        except OSError:
            return False
        try:
            raw = os.read(fd, _MAX_BYTES)
        finally:
            os.close(fd)
        info = _parse(raw)
        if info is None or info.pid != pid:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(RUNTIME_FILE, dir_fd=d.fd)
        return True
    finally:
        d.close()
