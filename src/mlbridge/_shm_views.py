"""The receiver's side of pooled shared memory: private views, release notices, sending back.

Theory of operation
-------------------
A handle of a pooled segment (:mod:`mlbridge._shm_pool`) is mapped by its receiver **private
copy-on-write** (``MAP_PRIVATE``): the array it gets is writable, but what it writes lands in
pages of its own, never in the file the sender reuses. The mapping is one ``mmap`` object per
handle; when the last array viewing it is gone the mapping is freed and a ``weakref.finalize``
callback tells the owner: for the peer's segment it increments ``released`` in the segment's
control page (a small shared mapping of the file's last page, which only we write); for one of
our own segments that came back, :meth:`SegmentPool.view_closed`.

Sending back without a copy (:meth:`Views.backing`): an array that is a contiguous piece of such
a view can go out as a handle of the same segment, if it still holds exactly the file's bytes.
It does unless the holder wrote into it; a write turned the written pages into anonymous
copies, which ``/proc/self/pagemap`` shows (present, not file-backed; or swapped). Any written
page, or no pagemap, means a copy as usual. A peer's segment sent back is counted in its
``bounced`` word *before* the frame is written, so its owner keeps it busy until the handle has
landed (and it holds a view of its own).

Threads: callbacks run on whichever thread drops the last reference, or in garbage collection;
the lock is reentrant and nothing here blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import stat
import threading
import weakref
from typing import Any, Final

from ._shm_pool import CTRL_BYTES, CTRL_WORDS, PAGE, Segment, SegmentPool

__all__ = ["Mapped", "Views", "unmodified"]

_PM_PRESENT: Final = 1 << 63
_PM_SWAPPED: Final = 1 << 62
_PM_FILE: Final = 1 << 61
_RW: Final = mmap.PROT_READ | mmap.PROT_WRITE


class Mapped:
    """One live private view: which segment, where it sits, whom to tell when it goes."""

    __slots__ = ("addr", "ctrl", "file_offset", "length", "mm", "name", "seg")

    def __init__(
        self,
        mm: mmap.mmap,
        name: str,
        file_offset: int,
        length: int,
        ctrl: mmap.mmap | None,
        seg: Segment | None,
    ) -> None:
        self.mm = weakref.ref(mm)
        self.name = name
        self.file_offset = file_offset
        self.length = length
        self.ctrl = ctrl  # the peer's segment: its control page (shared)
        self.seg = seg  # or one of ours, come back
        c = ctypes.c_char.from_buffer(mm)
        self.addr = ctypes.addressof(c)
        del c


class Views:
    def __init__(self, pool: SegmentPool | None) -> None:
        self.pool = pool
        self._live: dict[int, Mapped] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._live)

    def map_peer(self, path: str, name: str, offset: int, nbytes: int) -> tuple[mmap.mmap, int]:
        """A private view of ``nbytes`` at ``offset`` of the peer's pooled segment ``path``."""
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            capacity = st.st_size - CTRL_BYTES
            if not stat.S_ISREG(st.st_mode) or capacity % PAGE or offset + nbytes > capacity:
                raise ValueError(
                    f"shared-memory segment {name!r} holds {st.st_size} bytes: no room for "
                    f"{nbytes} at {offset} and its control page"
                )
            start = offset - offset % PAGE
            data = mmap.mmap(fd, offset + nbytes - start, mmap.MAP_PRIVATE, _RW, offset=start)
            ctrl = mmap.mmap(fd, CTRL_BYTES, mmap.MAP_SHARED, _RW, offset=capacity)
        finally:
            os.close(fd)
        self._track(Mapped(data, name, start, len(data), ctrl, None), data)
        return data, offset - start

    def map_own(self, seg: Segment, offset: int, nbytes: int) -> tuple[mmap.mmap, int]:
        """A private view of our own segment ``seg``, sent back by the peer."""
        assert self.pool is not None
        if offset + nbytes > seg.capacity:
            raise ValueError(f"segment {seg.name!r} has no {nbytes} bytes at {offset}")
        fd = os.open(seg.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            start = offset - offset % PAGE
            data = mmap.mmap(fd, offset + nbytes - start, mmap.MAP_PRIVATE, _RW, offset=start)
        finally:
            os.close(fd)
        self.pool.view_opened(seg)
        self._track(Mapped(data, seg.name, start, len(data), None, seg), data)
        return data, offset - start

    def _track(self, m: Mapped, data: mmap.mmap) -> None:
        key = id(data)
        with self._lock:
            self._live[key] = m
        fin = weakref.finalize(data, self._closed, key, m.ctrl, m.seg)
        fin.atexit = False

    def _closed(self, key: int, ctrl: mmap.mmap | None, seg: Segment | None) -> None:
        with self._lock:
            self._live.pop(key, None)
            if ctrl is not None:
                # (the control mapping goes with the last lease that may still undo a bounce)
                with contextlib.suppress(ValueError, OSError):
                    released, bounced = CTRL_WORDS.unpack_from(ctrl, 0)
                    CTRL_WORDS.pack_into(ctrl, 0, released + 1, bounced)
        if seg is not None and self.pool is not None:
            self.pool.view_closed(seg)

    def bounce(self, m: Mapped, delta: int) -> None:
        """Count a handle of the peer's segment sent back (``delta`` -1: one never framed)."""
        assert m.ctrl is not None
        with self._lock:
            released, bounced = CTRL_WORDS.unpack_from(m.ctrl, 0)
            CTRL_WORDS.pack_into(m.ctrl, 0, released, bounced + delta)

    def backing(self, arr: Any) -> tuple[Mapped, int] | None:
        """The view ``arr`` (a numpy array) lies in and its offset in the segment's file, when it
        can be sent as a handle of that segment: C-contiguous, in one tracked view, unwritten."""
        if not self._live or not arr.flags.c_contiguous:
            return None
        base = arr.base
        for _ in range(32):  # numpy collapses view chains; this only guards odd objects
            if base is None or type(base) is memoryview:
                break
            base = getattr(base, "base", None)
        if type(base) is not memoryview:
            return None
        obj = base.obj
        m = self._live.get(id(obj))
        if m is None or m.mm() is not obj:
            return None
        addr = int(arr.__array_interface__["data"][0])
        nbytes = int(arr.nbytes)
        if addr < m.addr or addr + nbytes > m.addr + m.length or not unmodified(addr, nbytes):
            return None
        return m, m.file_offset + addr - m.addr


def unmodified(addr: int, nbytes: int) -> bool:
    """No page of ``[addr, addr + nbytes)`` in a private file mapping was written: each is not
    present yet or is still the file's page (``/proc/self/pagemap``; False when unreadable)."""
    first, last = addr // PAGE, (addr + nbytes - 1) // PAGE
    count = last - first + 1
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)  # (per call: fork-safe)
        try:
            raw = os.pread(fd, count * 8, first * 8)
        finally:
            os.close(fd)
    except OSError:
        return False
    if len(raw) != count * 8:
        return False
    import numpy as np  # (only numpy arrays are sent back)

    v = np.frombuffer(raw, dtype=np.uint64)
    anon = (v & np.uint64(_PM_PRESENT | _PM_FILE)) == np.uint64(_PM_PRESENT)
    swapped = (v & np.uint64(_PM_SWAPPED)) != 0
    return not (bool(anon.any()) or bool(swapped.any()))
