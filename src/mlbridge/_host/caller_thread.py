"""The caller-thread side of a worker channel (the blocking API's fast path, see .direct).

A caller thread making a direct call reads the worker's output itself, so the reply wakes only
that thread. Where the transport can hold its output (:meth:`WorkerTransport.hold_output`), the
caller holds it from before the request is written until the reply is in; it reads once at once
(``read_reply_now``, in :mod:`.direct`) and, when the reply is not there yet, waits in
:func:`read_held` (polling for a moment first when a second CPU may be answering, then blocking
in ``poll``): the loop thread is not woken by the reply at all, and when nothing else awaits the
worker's output :func:`end_hold` leaves it parked, so the next blocking call holds it for free
(the loop watches it again before a call of its own). Otherwise it polls the output for
a moment (:func:`poll_reply`) and then waits for the loop to read the reply. The frames a caller
thread reads are routed by :class:`CallerThreadRouter`: its own reply settles its
:class:`SyncPending` at once; everything else is handed to the loop thread, in order, exactly as
if the loop had read it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .pending import SyncPending

if TYPE_CHECKING:
    from .._backends import WorkerTransport
    from .channel import WorkerChannel

__all__ = ["HELD_SLICE_S", "CallerThreadRouter", "end_hold", "poll_reply", "read_held"]

#: a caller thread waiting on held output looks at its call this often (the loop may settle it)
HELD_SLICE_S = 0.05


def read_held(
    transport: WorkerTransport, pending: SyncPending, limit: float, spin_s: float
) -> None:
    """Caller thread, output held: read the worker's output until ``pending`` is settled, the
    output ends (the loop then reports the exit and fails the call) or ``limit`` seconds pass;
    the first ``spin_s`` seconds without sleeping (a worker on another CPU answers in
    microseconds, faster than a sleeping thread wakes)."""
    now = time.perf_counter()
    spin_until = now + spin_s
    deadline = now + limit
    while pending.reply is None and pending.error is None:
        if now < spin_until:
            n = transport.read_now()
            if n == -1:
                os.sched_yield()
        else:  # in slices: the loop may settle the call meanwhile (an exit, the host closing)
            n = transport.read_wait(min(deadline - now, HELD_SLICE_S))
        if n == 0:
            return
        now = time.perf_counter()
        if now >= deadline:
            return


def end_hold(ch: WorkerChannel, settled: bool) -> None:
    """Caller thread: its call on held output is over (``settled``: it read its reply itself).
    The output stays parked (``release_output(park=True)``: the next blocking call holds it
    without a system call) when nothing else awaits a frame from the worker; else the loop
    reads it again at once."""
    transport = ch.transport
    assert transport is not None
    with ch._wlock:  # atomic with register(): a loop call is either seen here or re-watches
        transport.release_output(park=settled and not ch.pending and not ch.abandoned)


def poll_reply(ch: WorkerChannel, pending: SyncPending, spin_s: float) -> None:
    """Caller thread, direct path: read the worker's output for up to ``spin_s`` seconds,
    so a fast reply needs no thread to be woken (the loop would wake from epoll, then wake
    the caller)."""
    transport = ch.transport
    if transport is None:
        return
    deadline = time.perf_counter() + spin_s
    while pending.reply is None and pending.error is None:
        if transport.read_now() == 0:
            return  # end of output: the loop notices the exit and fails the call
        if time.perf_counter() >= deadline:
            return
        os.sched_yield()  # a worker sharing this CPU gets to run and answer


class CallerThreadRouter:
    """Connection events for frames a caller thread read: its own reply is settled at once,
    everything else goes to the loop thread, in order."""

    __slots__ = ("ch",)

    def __init__(self, ch: WorkerChannel) -> None:
        self.ch = ch

    def on_reply(self, rid: int, msg: dict[str, Any]) -> None:
        ch = self.ch
        ch.note_limit(msg)
        pending = ch.pending.get(rid)
        if isinstance(pending, SyncPending):
            if ch.pending.pop(rid, None) is pending:
                pending.settle(msg)
            return
        ch._loop.call_soon_threadsafe(ch.on_reply, rid, msg)

    def on_chunk(self, rid: int, chunk: Any) -> None:
        self.ch._loop.call_soon_threadsafe(self.ch.on_chunk, rid, chunk)

    def on_callback(self, msg: dict[str, Any]) -> None:
        self.ch._loop.call_soon_threadsafe(self.ch.on_callback, msg)

    def on_callback_cancel(self, cb: Any) -> None:
        self.ch._loop.call_soon_threadsafe(self.ch.on_callback_cancel, cb)

    def on_stray(self, msg: Any) -> None:
        self.ch._loop.call_soon_threadsafe(self.ch.on_stray, msg)

    def on_fatal(self, reason: str) -> None:
        self.ch._loop.call_soon_threadsafe(self.ch.on_fatal, reason)
