"""Calls waiting for a worker's reply: the asyncio kind, the caller-thread kind, and timeouts."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["EXITED", "Expired", "Pending", "SyncPending", "expire", "fail"]


@dataclass(slots=True)
class Pending:
    future: asyncio.Future[dict[str, Any]]
    chunks: asyncio.Queue[Any] | None = None
    start: int = 0  # offset of the request in the worker's input stream
    command: str = ""
    deadline: float = 0.0  # loop time its timeout fires (0: none, or no longer awaited)


class SyncPending:
    """A call made from a caller thread (MLBridge's direct path): :meth:`wait` blocks until
    another thread settles it (:meth:`settle`: ``reply`` or ``error``). Most such calls read
    their reply themselves and never wait, so the lock is made only by the first :meth:`wait`
    (published before ``reply``/``error`` are looked at again, so a settle is never missed)."""

    __slots__ = ("command", "error", "lock", "reply", "start")

    def __init__(self, command: str = "") -> None:
        self.start = 0
        self.command = command
        self.lock: threading.Lock | None = None
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def settle(self, reply: dict[str, Any] | None, error: BaseException | None = None) -> None:
        self.reply, self.error = reply, error
        lock = self.lock
        if lock is not None:
            lock.release()

    def wait(self, timeout: float) -> bool:
        """Until settled or ``timeout`` seconds pass: whether it was settled."""
        lock = self.lock
        if lock is None:
            lock = threading.Lock()
            lock.acquire()
            self.lock = lock
        if self.reply is not None or self.error is not None:
            return True
        return lock.acquire(timeout=timeout) or self.reply is not None or self.error is not None


EXITED = object()


class Expired(Exception):  # noqa: N818 - a private signal, never raised to users
    """Set on a call's reply future when its timeout fires (never leaves this module)."""


def expire(pending: Pending) -> None:
    fut = pending.future
    if not fut.done():
        # Late replies (during the cancel grace) land on a fresh future.
        pending.future = fut.get_loop().create_future()
        fut.set_exception(Expired())


def fail(p: Pending | SyncPending, error: BaseException) -> None:
    """End one call in flight with ``error`` (its caller, thread or task, wakes with it)."""
    if isinstance(p, SyncPending):
        p.settle(None, error)
        return
    if not p.future.done():
        p.future.set_exception(error)
    if p.chunks is not None:
        p.chunks.put_nowait(EXITED)
