"""Shared-memory payloads: large arrays and byte strings cross as a handle to a ``/dev/shm`` file.

Theory of operation
-------------------
Host and worker negotiate it in ``hello`` (the host offers ``{"prefix", "threshold",
"pool_bytes"}``; a worker that can write ``/dev/shm`` answers ``"shm": true`` and, when it keeps
a pool too, ``"shm_pool": true``); both then use a MessagePack codec built with a
:class:`ShmOffload`. On encode, a numpy array or byte string of at least ``threshold`` bytes is
copied into a segment and only an ext-type handle (name, size, dtype, shape; offset and mode for
a pooled one) goes in the frame. Three kinds of handle (:class:`Lease`, ``mode``):

* ``pool``: a segment of the sender's pool (:mod:`mlbridge._shm_pool`), pre-faulted and reused.
  The receiver maps it private copy-on-write (:mod:`mlbridge._shm_views`): the array it gets is
  a writable view, no copy; when the view goes, the receiver's release frees the segment for the
  sender to write again. A segment is never written while any view of it, or any handle naming
  it, is alive.
* ``back``: the receiver's own pooled segment: an array that is an unwritten piece of a view it
  got (an echo, a slice of the input) goes back as a handle of the segment it lies in.
* ``once``: a new file ``/dev/shm/<prefix><n>-<random>`` (mode 0600, ``O_EXCL``), which the
  receiver **unlinks at once** and maps; used when there is no pool (``pool_bytes`` 0) or the
  pool has no free room.

Names. Every name starts with ``mlbridge-<host pid>-<host start ticks>-`` (the host's identity,
as :mod:`mlbridge._host.reaper` checks it), then ``c<channel>-`` for one worker channel, then
``w<worker pid>-`` for what that worker writes; pooled segments add ``p<n>-``. A receiver
accepts only names under the prefix its peer writes (and of the shape written here), or, sent
back, a segment of its own pool, so a handle cannot name another file.

Nothing leaks:

* a normal call: a one-shot file was unlinked when decoded; a pooled segment stays in its pool
  (at most ``pool_bytes``) and is unlinked when its side closes;
* a worker killed mid-transfer: its channel's :meth:`ShmOffload.close` (run by the host when the
  worker exits) unlinks what the host wrote for it (its pool too) and every file under the
  worker's prefix; views still held stay valid (their mappings keep the pages);
* a host killed by SIGKILL (its workers die with it): the next host's start sweeps every file
  whose host pid and start ticks name no live process (:func:`sweep_dead_hosts`);
* an encode that fails half-way takes back what it had leased (:meth:`ShmOffload.discard`).
  (A frame that is encoded but then not sent, refused as over ``max_frame_bytes``, keeps its
  pooled segments busy until the channel closes: the pool shrinks, then one-shot files serve.)

Threads: ``put`` may run on several threads at once (the host's loop and caller threads); the
counter is an ``itertools.count``, the record of one-shot names a set changed atomically, and
the pool and the views have their own (reentrant) locks.
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
from typing import Any, Final

from ._shm_pool import SegmentPool
from ._shm_views import Views

__all__ = [
    "SHM_DIR",
    "Lease",
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


class Lease:
    """One handle being sent: how the peer reads it, and how to take it back if it never goes."""

    __slots__ = ("mode", "name", "offset", "undo")

    def __init__(self, mode: str, name: str, offset: int, undo: Callable[[], None]) -> None:
        self.mode = mode  # "once" (the peer unlinks it), "pool" (ours), "back" (the peer's own)
        self.name = name
        self.offset = offset
        self.undo = undo


class ShmOffload:
    """One side's shared-memory segments: writes its own (``put``) under ``prefix`` and reads
    the peer's (``take``), which must start with ``accept``. With ``pool_bytes`` > 0 it writes
    into a pool of reused segments (:mod:`mlbridge._shm_pool`) and maps the peer's privately
    (:mod:`mlbridge._shm_views`); otherwise every payload is a one-shot file."""

    def __init__(
        self, prefix: str, accept: str, threshold: int = DEFAULT_THRESHOLD, pool_bytes: int = 0
    ) -> None:
        if not valid_prefix(prefix) or not valid_prefix(accept):
            raise ValueError(f"invalid shared-memory prefix {prefix!r} / {accept!r}")
        self.prefix = prefix
        self.accept = accept
        self.threshold = threshold
        self._ids = itertools.count(1)
        self._written: set[str] = set()
        self.pool = SegmentPool(SHM_DIR, prefix, pool_bytes) if pool_bytes > 0 else None
        self.views = Views(self.pool)
        self.closed = False

    # ------------------------------------------------------------------ sending
    def put(self, data: memoryview) -> Lease:
        """Copy ``data`` (bytes-like, C-contiguous) into a pooled or a new segment."""
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        pool = self.pool
        seg = pool.acquire(view.nbytes) if pool is not None else None
        if seg is None:
            name = self._put_once(view)
            return Lease("once", name, 0, lambda: self.discard_names([name]))
        assert pool is not None
        try:
            pool.write(seg, view)
        except BaseException:
            pool.unsend(seg)
            raise
        return Lease("pool", seg.name, 0, lambda: pool.unsend(seg))

    def reuse(self, arr: Any) -> Lease | None:
        """A lease for sending numpy array ``arr`` without a copy: it is an unwritten piece of
        a segment we received (the peer's, or ours come back); None otherwise."""
        found = self.views.backing(arr)
        if found is None:
            return None
        m, offset = found
        seg = m.seg
        if seg is not None:  # ours: a handle of our pool segment, as if just written
            assert self.pool is not None
            if self.pool.closed:
                return None
            pool = self.pool
            pool.sent_again(seg)
            return Lease("pool", seg.name, offset, lambda: pool.unsend(seg))
        views = self.views
        views.bounce(m, 1)
        return Lease("back", m.name, offset, lambda: views.bounce(m, -1))

    def _put_once(self, view: memoryview) -> str:
        name = f"{self.prefix}{next(self._ids)}-{os.urandom(4).hex()}"
        fd = os.open(
            os.path.join(SHM_DIR, name),
            os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        self._written.add(name)
        try:
            total = view.nbytes
            done = 0
            while done < total:
                done += os.write(fd, view[done:])
        except BaseException:
            os.close(fd)
            self.discard_names([name])
            raise
        os.close(fd)
        if len(self._written) > _PRUNE_AT:
            self._prune()
        return name

    def discard(self, leases: Iterable[Lease]) -> None:
        """Take back leases whose frame will not be sent."""
        for lease in list(leases):
            lease.undo()

    def discard_names(self, names: Iterable[str]) -> None:
        """Unlink one-shot segments this side wrote (already consumed ones are simply gone)."""
        for name in list(names):
            self._written.discard(name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))

    def _prune(self) -> None:
        for name in list(self._written):
            if not os.path.exists(os.path.join(SHM_DIR, name)):
                self._written.discard(name)

    # ------------------------------------------------------------------ receiving
    def take(
        self, name: object, nbytes: object, offset: object = 0, mode: object = "once"
    ) -> tuple[mmap.mmap, int]:
        """Map the segment a handle names: the buffer and where the payload starts in it. A
        one-shot segment of the peer is unlinked at once; a pooled one (``pool``) or one of
        ours sent back (``back``) is mapped copy-on-write and released when its views go."""
        if not isinstance(nbytes, int) or nbytes < 1 or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"not a shared-memory handle of this peer: {name!r}")
        if mode == "back":
            seg = self.pool.segments.get(name) if self.pool is not None else None  # type: ignore[call-overload]
            if seg is None:
                raise ValueError(f"not a shared-memory segment of this side: {name!r}")
            return self.views.map_own(seg, offset, nbytes)
        if (
            mode not in ("once", "pool")
            or not isinstance(name, str)
            or not name.startswith(self.accept)
            or not _NAME_RE.fullmatch(name)
        ):
            raise ValueError(f"not a shared-memory handle of this peer: {name!r}")
        path = os.path.join(SHM_DIR, name)
        if mode == "pool":
            return self.views.map_peer(path, name, offset, nbytes)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != nbytes or offset:
                raise ValueError(
                    f"shared-memory segment {name!r} holds {st.st_size} bytes, not {nbytes}"
                )
            return mmap.mmap(fd, nbytes), 0
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ ending
    def close(self, peer_prefix: str | None = None) -> int:
        """Unlink everything this side wrote (its pool too), and (the host, when its worker is
        gone) every file under ``peer_prefix``; returns how many files were removed. Views
        still held stay valid: their mappings keep the pages."""
        self.closed = True
        removed = 0
        for name in list(self._written):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
        self._written.clear()
        if self.pool is not None:
            removed += self.pool.close()
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
