"""The sender's side of shared memory: a bounded pool of pre-faulted segments it writes into.

Theory of operation
-------------------
Writing a payload into a fresh ``/dev/shm`` file costs the kernel's page allocation and zeroing,
about three times the copy itself. So each side of a channel keeps a :class:`SegmentPool` of
files it created once (``posix_fallocate``, then mapped ``MAP_SHARED | MAP_POPULATE``) and copies
payloads into them at memory speed. A segment's file is ``capacity`` data bytes, then one control
page that only the *peer* writes (see :mod:`mlbridge._shm_views`): ``released``, the number of
views of this segment the peer made from our handles and has dropped since, and ``bounced``, the
number of handles of it the peer sent back to us without copying.

The lifetime rule: **a segment is written only while nobody can read it.** It is busy while

* a handle we sent is not yet matched by the peer's ``released`` (the peer may still read it:
  counted by ``sent``, incremented at :meth:`SegmentPool.acquire`, before the copy),
* a handle the peer sent back is in flight (``bounced`` ahead of our ``seen_back``), or
* one of our own views of it (received back from the peer) is alive (``local_views``).

Every view handed to user code is a private copy-on-write mapping, so a receiver that writes into
its array changes only its own pages; the file keeps the bytes that were sent.

Bounds: at most ``budget`` data bytes and :data:`MAX_SEGMENTS` files; capacities come in size
classes (eight per power of two) so a segment serves payloads a little smaller than the one that
made it. When no free segment fits and the budget is spent, free segments are evicted (least
recently used first); if everything is busy, :meth:`acquire` returns None and the caller sends a
one-shot file instead, as without a pool. :meth:`close` unlinks every file (views the peer still
holds stay valid: their mappings keep the pages).

Threads: any thread may acquire; the peer-release callbacks of :mod:`mlbridge._shm_views` and
garbage collection may run on any thread, even inside a locked section: the lock is reentrant and
the callbacks only change a counter.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
import threading
import time
from typing import Final

__all__ = ["CTRL_BYTES", "CTRL_WORDS", "MAX_SEGMENTS", "PAGE", "Segment", "SegmentPool"]

PAGE: Final = mmap.PAGESIZE
CTRL_BYTES: Final = max(PAGE, mmap.ALLOCATIONGRANULARITY)  # the control page after the data
CTRL_WORDS: Final = struct.Struct("=QQ")  # released, bounced: written by the peer only
MAX_SEGMENTS: Final = 32

_OPEN_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


def size_class(nbytes: int) -> int:
    """The capacity of the segment that holds ``nbytes``: a page multiple, at most 1/8 over."""
    step = max(PAGE, 1 << max(0, (nbytes - 1).bit_length() - 3))
    return -(-nbytes // step) * step


class Segment:
    """One pooled file: its mapping (data, then the control page) and who may still read it."""

    __slots__ = ("capacity", "last_used", "local_views", "map", "name", "path", "seen_back", "sent")

    def __init__(self, name: str, path: str, capacity: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.path = path
        self.capacity = capacity
        self.map = mapping
        self.sent = 0
        self.seen_back = 0
        self.local_views = 0
        self.last_used = time.monotonic()

    def busy(self) -> bool:
        released, bounced = CTRL_WORDS.unpack_from(self.map, self.capacity)
        return bool(self.local_views) or released != self.sent or bounced != self.seen_back


class SegmentPool:
    """The segments one side writes (names ``<prefix>p<n>-<random>``), at most ``budget`` bytes."""

    def __init__(self, directory: str, prefix: str, budget: int) -> None:
        self.directory = directory
        self.prefix = prefix
        self.budget = budget
        self.segments: dict[str, Segment] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self.closed = False

    @property
    def total_bytes(self) -> int:
        return sum(s.capacity for s in list(self.segments.values()))

    def acquire(self, nbytes: int) -> Segment | None:
        """A free segment for ``nbytes``, marked as sent (the caller copies, then frames its
        handle; :meth:`unsend` if it gives up); None when the pool cannot serve it."""
        capacity = size_class(nbytes)
        if capacity > self.budget:
            return None
        with self._lock:
            if self.closed:
                return None
            seg = next(
                (s for s in self.segments.values() if s.capacity == capacity and not s.busy()),
                None,
            )
            if seg is None and self._make_room(capacity):
                seg = self._create(capacity)
            if seg is None:
                return None
            seg.sent += 1
            seg.last_used = time.monotonic()
            return seg

    def _make_room(self, capacity: int) -> bool:
        over = self.total_bytes + capacity - self.budget
        count_over = len(self.segments) + 1 - MAX_SEGMENTS
        if over <= 0 and count_over <= 0:
            return True
        free = sorted((s for s in self.segments.values() if not s.busy()), key=_lru)
        for seg in free:
            if over <= 0 and count_over <= 0:
                break
            self._drop(seg)
            over -= seg.capacity
            count_over -= 1
        return over <= 0 and count_over <= 0

    def _create(self, capacity: int) -> Segment | None:
        name = f"{self.prefix}p{next(self._ids)}-{os.urandom(4).hex()}"
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o600)
        except OSError:
            return None
        try:
            # fallocate, not a sparse file: a full /dev/shm is ENOSPC here, not SIGBUS later
            os.posix_fallocate(fd, 0, capacity + CTRL_BYTES)
            populate = getattr(mmap, "MAP_POPULATE", 0)
            mapping = mmap.mmap(fd, capacity + CTRL_BYTES, flags=mmap.MAP_SHARED | populate)
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        finally:
            os.close(fd)  # (the mapping keeps its own descriptor)
        seg = Segment(name, path, capacity, mapping)
        self.segments[name] = seg
        return seg

    def write(self, seg: Segment, data: memoryview) -> None:
        """Copy ``data`` (format ``B``) to the start of ``seg`` (numpy's copy, which releases the
        GIL, when numpy is importable)."""
        n = data.nbytes
        try:
            import numpy as np
        except ImportError:
            seg.map[:n] = data
            return
        dst = np.frombuffer(seg.map, dtype=np.uint8, count=n)
        np.copyto(dst, np.frombuffer(data, dtype=np.uint8))
        del dst

    def unsend(self, seg: Segment) -> None:
        """Undo :meth:`acquire` (the handle was never framed)."""
        with self._lock:
            seg.sent -= 1

    def sent_again(self, seg: Segment) -> None:
        """A handle of ``seg`` goes out once more (our own view of it, sent on unchanged)."""
        with self._lock:
            seg.sent += 1
            seg.last_used = time.monotonic()

    def view_opened(self, seg: Segment) -> None:
        """The peer sent ``seg`` back and we map it: its bounce has landed."""
        with self._lock:
            seg.seen_back += 1
            seg.local_views += 1

    def view_closed(self, seg: Segment) -> None:
        with self._lock:
            seg.local_views -= 1

    def _drop(self, seg: Segment) -> None:
        self.segments.pop(seg.name, None)
        with contextlib.suppress(OSError):
            os.unlink(seg.path)
        with contextlib.suppress(BufferError):
            seg.map.close()  # (still exported by a copy in progress: it goes with its last user)

    def close(self) -> int:
        """Unlink every segment; returns how many there were."""
        with self._lock:
            self.closed = True
            segs = list(self.segments.values())
            for seg in segs:
                self._drop(seg)
        return len(segs)


def _lru(seg: Segment) -> float:
    return seg.last_used
