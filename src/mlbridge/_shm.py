"""Shared-memory payloads: large arrays and byte strings cross as a handle to a ``/dev/shm`` file.

Theory of operation
-------------------
Host and worker negotiate it in ``hello`` (the host offers ``{"prefix", "threshold"}``; a worker
that can write ``/dev/shm`` answers ``"shm": true``); both then use a MessagePack codec built
with a :class:`ShmOffload`. On encode, a numpy array or byte string of at least ``threshold``
bytes is written into a new file ``/dev/shm/<prefix><n>-<random>`` (mode 0600, ``O_EXCL``) and
only an ext-type handle (name, size, dtype, shape) goes in the frame. On decode the receiver
opens the file, **unlinks it at once**, checks its size, and maps it: the array it returns is a
view of that mapping (no copy), and the memory goes back when the array is dropped.

Names. Every name starts with ``mlbridge-<host pid>-<host start ticks>-`` (the host's identity,
as :mod:`mlbridge._host.reaper` checks it), then ``c<channel>-`` for one worker channel, then
``w<worker pid>-`` for what that worker writes. A receiver accepts only names under the prefix
its peer writes (and of the shape written here), so a handle cannot name another file.

Nothing leaks:

* a normal call: the receiver unlinked the file when it decoded the frame;
* a worker killed mid-transfer: its channel's :meth:`ShmOffload.close` (run by the host when the
  worker exits) unlinks what the host wrote for it and every file under the worker's prefix;
* a host killed by SIGKILL (its workers die with it): the next host's start sweeps every file
  whose host pid and start ticks name no live process (:func:`sweep_dead_hosts`);
* an encode that fails half-way unlinks what it had written (:meth:`ShmOffload.discard`).

Threads: ``put`` may run on several threads at once (the host's loop and caller threads); the
counter is an ``itertools.count`` and the record of written names a set, changed atomically.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import re
import stat
from collections.abc import Callable, Iterable
from typing import Final

__all__ = [
    "SHM_DIR",
    "ShmOffload",
    "host_prefix",
    "shm_available",
    "sweep_dead_hosts",
    "sweep_prefix",
]

SHM_DIR: Final = "/dev/shm"
DEFAULT_THRESHOLD: Final = 1 << 20
_NAME_RE: Final = re.compile(r"mlbridge-[0-9]+-[0-9]+-[a-z0-9-]+\Z")
_HOST_RE: Final = re.compile(r"mlbridge-([0-9]+)-([0-9]+)-")
_PRUNE_AT: Final = 256

log = logging.getLogger("mlbridge.shm")


def host_prefix(pid: int, start: int) -> str:
    return f"mlbridge-{pid}-{start}-"


def valid_prefix(prefix: object) -> bool:
    return isinstance(prefix, str) and _NAME_RE.fullmatch(prefix + "0") is not None


def shm_available() -> bool:
    """``/dev/shm`` is a writable directory for this user."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)


class ShmOffload:
    """One side's shared-memory segments: writes its own (``put``) under ``prefix`` and reads
    the peer's (``take``), which must start with ``accept``."""

    def __init__(self, prefix: str, accept: str, threshold: int = DEFAULT_THRESHOLD) -> None:
        if not valid_prefix(prefix) or not valid_prefix(accept):
            raise ValueError(f"invalid shared-memory prefix {prefix!r} / {accept!r}")
        self.prefix = prefix
        self.accept = accept
        self.threshold = threshold
        self._ids = itertools.count(1)
        self._written: set[str] = set()
        self.closed = False

    # ------------------------------------------------------------------ sending
    def put(self, data: memoryview) -> str:
        """Write ``data`` (bytes-like, C-contiguous) into a new segment; returns its name."""
        name = f"{self.prefix}{next(self._ids)}-{os.urandom(4).hex()}"
        fd = os.open(
            os.path.join(SHM_DIR, name),
            os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        self._written.add(name)
        try:
            view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
            total = view.nbytes
            done = 0
            while done < total:
                done += os.write(fd, view[done:])
        except BaseException:
            os.close(fd)
            self.discard([name])
            raise
        os.close(fd)
        if len(self._written) > _PRUNE_AT:
            self._prune()
        return name

    def discard(self, names: Iterable[str]) -> None:
        """Unlink segments this side wrote (already consumed ones are simply gone)."""
        for name in list(names):
            self._written.discard(name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))

    def _prune(self) -> None:
        for name in list(self._written):
            if not os.path.exists(os.path.join(SHM_DIR, name)):
                self._written.discard(name)

    # ------------------------------------------------------------------ receiving
    def take(self, name: object, nbytes: object) -> mmap.mmap:
        """Open the peer's segment ``name``, unlink it, and map its ``nbytes`` bytes."""
        if (
            not isinstance(name, str)
            or not name.startswith(self.accept)
            or not _NAME_RE.fullmatch(name)
            or not isinstance(nbytes, int)
            or nbytes < 1
        ):
            raise ValueError(f"not a shared-memory handle of this peer: {name!r}")
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != nbytes:
                raise ValueError(
                    f"shared-memory segment {name!r} holds {st.st_size} bytes, not {nbytes}"
                )
            return mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ ending
    def close(self, peer_prefix: str | None = None) -> int:
        """Unlink everything this side wrote, and (the host, when its worker is gone) every
        file under ``peer_prefix``; returns how many files were removed."""
        self.closed = True
        removed = 0
        for name in list(self._written):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
        self._written.clear()
        if peer_prefix is not None:
            removed += sweep_prefix(peer_prefix)
        return removed


def _listdir() -> list[str]:
    try:
        return [n for n in os.listdir(SHM_DIR) if n.startswith("mlbridge-")]
    except OSError:
        return []


def _unlink_own(name: str) -> bool:
    """Unlink ``/dev/shm/name`` when it is a regular file of this user."""
    path = os.path.join(SHM_DIR, name)
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return False
        os.unlink(path)
    except OSError:
        return False
    return True


def sweep_prefix(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (a dead worker's)."""
    if not valid_prefix(prefix):
        return 0
    return sum(_unlink_own(n) for n in _listdir() if n.startswith(prefix))


def sweep_dead_hosts(alive_since: Callable[[int, int], bool]) -> int:
    """At host start: unlink the segments of every host that is gone (``alive_since(pid,
    start)`` false: no process has that pid with that start time). A live host's are kept."""
    removed = 0
    verdicts: dict[tuple[int, int], bool] = {}
    for name in _listdir():
        m = _HOST_RE.match(name)
        if m is None or not _NAME_RE.fullmatch(name):
            continue
        ident = (int(m.group(1)), int(m.group(2)))
        if ident not in verdicts:
            verdicts[ident] = alive_since(*ident)
        if not verdicts[ident] and _unlink_own(name):
            removed += 1
    if removed:
        log.info("removed %d shared-memory segment(s) left by hosts that died", removed)
    return removed
