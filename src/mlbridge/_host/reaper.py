"""Leftover workers of an earlier host: record every worker, reap proven orphans at start.

Theory of operation
-------------------
Workers already die with their host: their input pipe closes (they exit 0 within a second) and
Linux's PR_SET_PDEATHSIG kills them even when the host was SIGKILLed. Neither reaches what a
worker started itself (a child in the worker's process group). This module is the third line.

Records. Each host (one :class:`PidRegistry`) draws a random token and puts it in every worker's
environment (:meth:`PidRegistry.worker_env`, ``MLBRIDGE_HOST_TOKEN``); children inherit it. For
each live worker it writes ``<runtime>/workers/w-<pid>-<token>.rec`` (JSON: the worker's pid,
start time and process group from ``/proc/<pid>/stat``, the host's pid and start time, the
token), atomically (temporary file, then rename), inside the checked private directory of
:mod:`.runtime_dir` and only through its descriptor.

Proof of identity, checked before any signal (:func:`survivors`):

- the record's host is gone: no process has its pid with its start time (a live host, this one
  or another, is never reaped);
- a process counts as the record's only when it is alive (not a zombie), started no earlier than
  the worker, belongs to the recorded process group, and carries the record's token in
  ``/proc/<pid>/environ`` (readable only by its owner); a pidfd is opened before the check, so
  the signal reaches the process that was checked even if its pid is reused meanwhile;
- the whole group is signalled (``killpg``) only when the worker led its own group (the local
  backend starts every worker in its own session) and a proven member is alive. If the pid now
  belongs to another process (another start time), the original group is gone: Linux does not
  reuse a number while a group of that id exists, so nothing is signalled.

A command line is never evidence: ``tail -f mlbridge.worker.log`` or a live worker of another
host match none of the above. Processes of the group that dropped the token from their
environment are killed with the group when a proven member is still alive, never on their own.

Removal. Every record is removed when its worker exits (:meth:`PidRegistry.unregister`, which
first kills proven leftovers of the worker's group), when the host closes (:meth:`close`), at
interpreter exit (``atexit``), on SIGTERM/SIGHUP while their disposition is the default (the
handler cleans up, then dies by the same signal), and by the next host's :meth:`reap` for hosts
that died by SIGKILL. Only well-formed records are read or unlinked: name, regular file, owner,
size and content must all match what this module writes; anything else in the directory is left
alone.

Threads: ``register``/``unregister`` run on the loop thread, ``atexit`` and signal handlers on
the main thread; the record table changes by atomic dict operations and is copied to iterate.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import stat
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from .procfs import alive_since, has_env_entry, pidfd, proc_stat, process_groups
from .runtime_dir import RuntimeDir, RuntimeDirError, open_path, open_runtime_dir

__all__ = ["TOKEN_ENV", "PidRegistry", "WorkerRecord", "install_exit_handlers", "survivors"]

TOKEN_ENV = "MLBRIDGE_HOST_TOKEN"

log = logging.getLogger("mlbridge.host")

_NAME = re.compile(r"w-([1-9][0-9]{0,9})-([0-9a-f]{32})\.rec\Z")
_MAX_RECORD_BYTES = 1024
_FIELDS = ("pid", "start", "pgid", "host_pid", "host_start", "token")


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    pid: int
    start: int  # clock ticks after boot (/proc/<pid>/stat field 22)
    pgid: int
    host_pid: int
    host_start: int
    token: str

    @property
    def filename(self) -> str:
        return f"w-{self.pid}-{self.token}.rec"

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, name: str, data: bytes) -> WorkerRecord | None:
        """The record in ``data`` if it is exactly what :meth:`encode` writes under ``name``."""
        m = _NAME.match(name)
        if m is None:
            return None
        try:
            raw = json.loads(data)
        except ValueError:
            return None
        if not isinstance(raw, dict) or sorted(raw) != sorted(_FIELDS):
            return None
        if not all(type(raw[k]) is int and raw[k] > 0 for k in _FIELDS[:5]):
            return None
        if type(raw["token"]) is not str:
            return None
        rec = cls(
            raw["pid"], raw["start"], raw["pgid"], raw["host_pid"], raw["host_start"], raw["token"]
        )
        if str(rec.pid) != m.group(1) or rec.token != m.group(2):
            return None
        return rec


def survivors(
    rec: WorkerRecord, groups: dict[int, list[int]] | None = None
) -> list[tuple[int, int]]:
    """Live processes proven to belong to ``rec`` (see the module docstring), as
    ``(pid, pidfd)``; the caller closes the pidfds (-1 where pidfds are unavailable).
    ``groups`` (from :func:`.procfs.process_groups`) saves a pass over /proc when checking
    many records; every candidate is checked again here, so a stale map only makes the answer
    smaller."""
    leader = proc_stat(rec.pid)
    if leader is not None and leader.start != rec.start:
        return []  # the pid is another process now, so the worker's group is gone too
    if rec.pgid == rec.pid:
        if groups is None:
            groups = process_groups()
        candidates = list(groups.get(rec.pgid, ()))
        if rec.pid not in candidates:
            candidates.append(rec.pid)
    else:  # not a group leader: its group is someone else's, only the worker itself counts
        candidates = [rec.pid]
    found: list[tuple[int, int]] = []
    for pid in candidates:
        fd = pidfd(pid)
        # Checked after the pidfd is open: the pidfd then names the process that passed.
        st = proc_stat(pid)
        if (
            st is not None
            and st.pgrp == rec.pgid
            and st.state not in ("Z", "X")
            and st.start >= rec.start
            and (pid != rec.pid or st.start == rec.start)
            and has_env_entry(pid, f"{TOKEN_ENV}={rec.token}")
        ):
            found.append((pid, fd))
        elif fd >= 0:
            os.close(fd)
    return found


def _kill_proven(rec: WorkerRecord, groups: dict[int, list[int]] | None = None) -> list[int]:
    """SIGKILL what :func:`survivors` proves is ``rec``'s (its group when it led one)."""
    proven = survivors(rec, groups)
    try:
        if proven and rec.pgid == rec.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(rec.pgid, signal.SIGKILL)
        for pid, fd in proven:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                if fd >= 0:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
    finally:
        for _, fd in proven:
            if fd >= 0:
                os.close(fd)
    return [pid for pid, _ in proven]


class PidRegistry:
    """Records of this host's workers; reaps proven orphans of dead hosts.

    ``directory``: use this directory (checked like the runtime directory) instead of
    ``<runtime dir>/workers``. ``exit_hooks``: remove this host's records (killing what is
    proven left of its workers) at interpreter exit and on SIGTERM/SIGHUP.
    """

    def __init__(self, directory: Path | str | None = None, *, exit_hooks: bool = True) -> None:
        self.token = secrets.token_hex(16)
        self.host_pid = os.getpid()
        st = proc_stat(self.host_pid)
        self.host_start = st.start if st is not None else 0
        self._records: dict[int, WorkerRecord] = {}
        self._dir: RuntimeDir | None = None
        self._closed = False
        try:
            if directory is not None:
                self._dir = open_path(os.fspath(directory))
            else:
                root = open_runtime_dir()
                if root is not None:
                    try:
                        self._dir = root.subdir("workers")
                    finally:
                        root.close()
        except RuntimeDirError as exc:
            log.warning(
                "refusing %s for worker records: %s; orphan reaping is off",
                directory if directory is not None else "<runtime dir>/workers",
                exc,
            )
        if exit_hooks:
            _LIVE.add(self)
            install_exit_handlers()

    @property
    def enabled(self) -> bool:
        return self._dir is not None and self._dir.fd >= 0

    @property
    def directory(self) -> str | None:
        return self._dir.path if self._dir is not None else None

    def worker_env(self) -> dict[str, str]:
        """Variables every worker of this host must get (they prove a process is ours)."""
        return {TOKEN_ENV: self.token}

    def register(self, pid: int) -> None:
        d = self._dir
        if d is None or d.fd < 0:
            return
        st = proc_stat(pid)
        if st is None or self.host_start == 0:
            return  # already gone (or no /proc): nothing to prove later
        rec = WorkerRecord(pid, st.start, st.pgrp, self.host_pid, self.host_start, self.token)
        tmp = f".tmp-{rec.filename}"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=d.fd,
            )
            try:
                os.write(fd, rec.encode())
            finally:
                os.close(fd)
            os.rename(tmp, rec.filename, src_dir_fd=d.fd, dst_dir_fd=d.fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=d.fd)
            log.warning("cannot record worker pid %d in %s: %s", pid, d.path, exc)
            return
        self._records[pid] = rec

    def unregister(self, pid: int) -> None:
        """The worker exited: kill proven leftovers of its group, then drop its record.
        (Called while the worker still runs, it only drops the record.)"""
        rec = self._records.pop(pid, None)
        if rec is None:
            return
        if alive_since(rec.pid, rec.start):
            self._unlink(rec)
            return
        killed = [p for p in _kill_proven(rec) if p != pid]
        if killed:
            log.warning(
                "killed %d process(es) %s left in the group of exited worker %d",
                len(killed),
                killed,
                pid,
            )
        self._unlink(rec)

    def reap(self) -> list[int]:
        """Kill what is proven left of workers whose host is gone; return those workers' pids.

        Records of dead hosts are removed whether or not anything was left to kill.
        """
        d = self._dir
        if d is None or d.fd < 0:
            return []
        reaped: list[int] = []
        groups: dict[int, list[int]] | None = None
        for name in _listdir(d.fd):
            rec = _read_record(d.fd, name)
            if rec is None:
                continue
            if alive_since(rec.host_pid, rec.host_start):
                continue  # its host still runs (maybe this very process)
            if groups is None:
                groups = process_groups()
            killed = _kill_proven(rec, groups)
            if killed:
                reaped.append(rec.pid)
                log.warning(
                    "reaped leftovers %s of worker %d of dead host %d",
                    killed,
                    rec.pid,
                    rec.host_pid,
                )
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=d.fd)
        return reaped

    def close(self) -> None:
        """Kill proven leftovers of this host's recorded workers and remove their records.
        Idempotent; call it after the pools have stopped their workers."""
        if self._closed:
            return
        self._closed = True
        self._cleanup()
        _LIVE.discard(self)
        if self._dir is not None:
            self._dir.close()

    def _cleanup(self) -> None:
        if os.getpid() != self.host_pid:
            return  # a forked child inherited our hooks: the records are the parent's
        groups: dict[int, list[int]] | None = None
        for pid in list(dict(self._records)):
            rec = self._records.pop(pid, None)
            if rec is not None:
                if groups is None:
                    groups = process_groups()
                _kill_proven(rec, groups)
                self._unlink(rec)

    def _unlink(self, rec: WorkerRecord) -> None:
        d = self._dir
        if d is not None and d.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(rec.filename, dir_fd=d.fd)


def _listdir(fd: int) -> list[str]:
    try:
        return os.listdir(fd)
    except OSError:
        return []


def _read_record(dir_fd: int, name: str) -> WorkerRecord | None:
    """A well-formed record file named ``name``, or None (the file is then left alone)."""
    if _NAME.match(name) is None:
        return None
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_uid != os.getuid()
            or st.st_size > _MAX_RECORD_BYTES
        ):
            return None
        data = os.read(fd, _MAX_RECORD_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return WorkerRecord.decode(name, data)


# ---------------------------------------------------------------------- exit paths
# Strong references: a host dropped without close() still has its records cleaned at exit.
_LIVE: set[PidRegistry] = set()
_installed = False
_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _cleanup_all() -> None:
    for reg in list(_LIVE):
        try:
            reg._cleanup()
        except Exception:  # never let cleanup turn an exit into a traceback
            log.debug("worker record cleanup failed", exc_info=True)


def _on_exit_signal(signum: int, frame: FrameType | None) -> None:
    _cleanup_all()
    # Die by the same signal, as the default disposition would have.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_exit_handlers() -> None:
    """Clean up every live registry's records at exit: ``atexit`` always, and SIGTERM/SIGHUP
    handlers where their disposition is still the default (an application's own handler is
    never replaced). Signal handlers can only be installed from the main thread: call this
    from there (``MLBridge()`` constructs its host on its loop thread). Idempotent."""
    global _installed
    if not _installed:
        _installed = True
        atexit.register(_cleanup_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _EXIT_SIGNALS:
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _on_exit_signal)
        except (ValueError, OSError):  # not the main interpreter, or no such signal
            pass
