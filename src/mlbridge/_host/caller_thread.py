"""The caller-thread side of a worker channel (the blocking API's fast path, see .direct).

A caller thread that wrote a direct call may read the worker's output itself for a moment
(:func:`poll_reply`), so a fast reply needs no thread wake-up. The frames it reads are routed by
:class:`CallerThreadRouter`: its own reply settles its :class:`SyncPending` at once; everything
else is handed to the loop thread, in order, exactly as if the loop had read it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .pending import SyncPending

if TYPE_CHECKING:
    from .channel import WorkerChannel

__all__ = ["CallerThreadRouter", "poll_reply"]


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
        if msg.get("error_code") == "resource_limit":
            ch.doomed = True  # the worker stops itself after this reply (see WorkerChannel)
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
