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
    """A call made from a caller thread (MLBridge's direct path): it blocks on ``lock``, which
    the loop thread releases once ``reply`` or ``error`` is set."""

    __slots__ = ("command", "error", "lock", "reply", "start")

    def __init__(self, command: str = "") -> None:
        self.start = 0
        self.command = command
        self.lock = threading.Lock()
        self.lock.acquire()
        self.reply: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def settle(self, reply: dict[str, Any] | None, error: BaseException | None = None) -> None:
        self.reply, self.error = reply, error
        self.lock.release()


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
