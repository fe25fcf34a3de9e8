"""Call policy on one worker channel: wait for the reply, time out, cancel, grace, kill; streams.

Theory of operation
-------------------
:func:`call` writes a request on a :class:`~.channel.WorkerChannel` and waits for its reply on
the loop. Past ``timeout`` the worker is asked to cancel; a worker that does not answer within
``cancel_grace`` is killed (the pool replaces it) and the caller gets
:class:`CallTimeoutError` saying which happened. A caller that gives up (its task is cancelled)
cancels the call in the worker too. :func:`stream` does the same for a streaming call, yielding
chunks as they arrive; a consumer that stops early cancels the call.

A call is the only user of its reply future, so no lock is needed: everything here runs on the
host's event loop thread. Timeouts share one timer per channel (``deadline_timer``), armed for
the earliest deadline of the calls waiting on it and re-armed when it fires; a call that ends
just clears its deadline.

Before it sleeps, a call reads the worker's output once (on one CPU the reply is often there
already) and, with CPUs to spare and nothing else runnable, polls it for a moment: a reply read
this way ends the call without a loop iteration. At most ``MAX_STREAK`` calls in a row end so;
the next one awaits its reply, so the loop still polls its other I/O and runs its timers while a
caller loops over calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..errors import CallTimeoutError, MLBridgeError
from .pending import EXITED, Expired, Pending, expire

if TYPE_CHECKING:
    from .channel import WorkerChannel

__all__ = [
    "MANY_CPUS",
    "MAX_STREAK",
    "call",
    "cancel_call",
    "end_streak",
    "streak_open",
    "stream",
    "timeout_error",
    "wait_reply",
]

# An idle asyncio loop polls for a call's reply this long before sleeping in epoll.
ASYNC_SPIN_S = 100e-6
# Polling only pays when the worker can run on another CPU meanwhile.
MANY_CPUS = len(getattr(os, "sched_getaffinity", lambda _: {0, 1})(0)) > 1
# Calls awaiting a reply on this process's loop(s); polling only pays when there is one.
_LOOP_CALLS = [0]
_CLOCK_RESOLUTION = time.get_clock_info("monotonic").resolution
# Calls answered in a row without suspending (their reply was read at once): after this many,
# the next one awaits its reply, so a caller looping over calls cannot keep the loop from
# polling other I/O and running timers (like asyncio's streams, a ready result is not a yield).
MAX_STREAK = 16
_STREAK = [0]


def streak_open() -> bool:
    """May a call end without suspending now (fewer than MAX_STREAK did in a row)?"""
    return _STREAK[0] < MAX_STREAK


def end_streak() -> None:
    """A call ended without suspending (see MAX_STREAK)."""
    _STREAK[0] += 1


def timeout_error(ch: WorkerChannel, command: str, timeout: float) -> CallTimeoutError:
    fate = (
        "the worker did not stop, so it was killed and will be replaced"
        if ch.doomed
        else "the worker stopped it and stays in the pool"
    )
    return CallTimeoutError(
        f"{ch.bridge}:{command} on worker {ch.worker_id} ran past its {timeout:g}s "
        f"timeout; {fate}. Raise the call's timeout (or the bridge option 'timeout') if "
        "it is expected to run longer.",
        worker_id=ch.worker_id,
    )


async def call(
    ch: WorkerChannel,
    command: str,
    args: dict[str, Any],
    *,
    timeout: float | None = None,
    session_id: str | None = None,
    cancel_grace: float = 1.0,
) -> dict[str, Any]:
    """Send ``command`` and return the worker's final reply (success or failure message)."""
    rid, pending = ch.start_request(command, args, session_id=session_id)
    return await wait_reply(ch, rid, pending, command, timeout, cancel_grace)


async def wait_reply(
    ch: WorkerChannel,
    rid: int,
    pending: Pending,
    command: str,
    timeout: float | None,
    cancel_grace: float,
    *,
    look: bool = True,
) -> dict[str, Any]:
    """The reply to call ``rid``, under the call policy (module docstring); ``look=False``:
    the caller has read the output once already."""
    # Hot path: await the reply future itself with a timer beside it (two loop iterations a
    # call, where wait_for(shield(...)) costs four and three extra objects).
    fut = pending.future
    loop = asyncio.get_running_loop()
    transport = ch.transport
    streak = _STREAK[0]
    if look and transport is not None and streak < MAX_STREAK:
        # Look for the reply before sleeping in epoll. On one CPU the worker often ran while
        # we wrote (the woken reader preempts the writer) and its reply is already waiting:
        # one read takes it, with no loop iteration.
        transport.read_now()
        ready = getattr(loop, "_ready", None)
        if (
            not fut.done()
            and MANY_CPUS
            and ready is not None
            and not ready
            and len(ch.pending) == 1
            and _LOOP_CALLS[0] == 0
        ):
            # Nothing else is runnable on this loop and the worker has a CPU of its own: poll
            # its output for a moment instead of paying a wake-up for a reply microseconds
            # away. Any other callback becoming ready ends the poll at once.
            deadline = time.perf_counter() + ASYNC_SPIN_S
            while not fut.done() and not ready and time.perf_counter() < deadline:
                if transport.read_now() == 0:
                    break
                os.sched_yield()  # a worker sharing this CPU gets to run and answer
        if fut.done():
            _STREAK[0] = streak + 1
            return fut.result()
    _STREAK[0] = 0  # this call suspends: the loop polls its I/O and runs its timers
    if timeout is not None:
        pending.deadline = deadline = loop.time() + timeout
        timer = ch.deadline_timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            ch.deadline_timer = loop.call_at(deadline, _expire_due, ch)
    _LOOP_CALLS[0] += 1
    try:
        return await fut
    except Expired:
        pass
    except asyncio.CancelledError:
        # The caller gave up (task cancelled): stop the work in the worker too.
        if rid in ch.pending:
            ch.send_cancel(rid)
            # The worker is still busy with it: the pool hands it out again only once it
            # answered (or kills it after cancel_grace), never to a caller who would queue
            # behind the abandoned call. Its reply lands on a fresh future (the awaited one
            # was cancelled with us). Nobody awaits that outcome: it is marked as seen, so a
            # crash that fails it is not reported again as "exception was never retrieved".
            pending.future = loop.create_future()
            pending.future.add_done_callback(_seen)
            ch.abandoned[rid] = pending
        raise
    finally:
        _LOOP_CALLS[0] -= 1
        pending.deadline = 0.0
    assert timeout is not None
    # Past the deadline: ask the worker to cancel, give it a short grace, then kill it.
    await cancel_call(ch, rid, command, cancel_grace)
    raise timeout_error(ch, command, timeout)


def _expire_due(ch: WorkerChannel) -> None:
    """The channel's one deadline timer: expire the calls past their deadline, then re-arm
    for the earliest one left. (A timer per call would cost a heap push and a cancel each;
    this one is armed for the earliest deadline and re-armed only when it fires.)"""
    ch.deadline_timer = None
    loop = asyncio.get_running_loop()
    now = loop.time() + _CLOCK_RESOLUTION  # (asyncio may run a timer that much early)
    earliest = 0.0
    for p in list(ch.pending.values()):
        if not isinstance(p, Pending) or not p.deadline:
            continue
        deadline = p.deadline
        if deadline <= now:
            p.deadline = 0.0
            expire(p)
        elif not earliest or deadline < earliest:
            earliest = deadline
    if earliest:
        ch.deadline_timer = loop.call_at(earliest, _expire_due, ch)


def _seen(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def cancel_call(ch: WorkerChannel, rid: int, command: str, grace: float) -> None:
    """Ask the worker to cancel call ``rid``; kill it if the call is still running after
    ``grace`` seconds. Returns once the call has ended either way."""
    pending = ch.pending.get(rid)
    if not isinstance(pending, Pending):
        return
    fut = pending.future
    ch.send_cancel(rid)
    try:
        await asyncio.wait_for(asyncio.shield(fut), grace)
        return
    except (TimeoutError, MLBridgeError):
        pass
    ch.pending.pop(rid, None)
    if not fut.done():
        fut.cancel()
    ch.kill(f"it did not stop {command!r} within {grace:g}s of a cancel")


async def stream(
    ch: WorkerChannel,
    command: str,
    args: dict[str, Any],
    *,
    timeout: float | None = None,
    session_id: str | None = None,
    cancel_grace: float = 1.0,
    replies: list[dict[str, Any]] | None = None,
) -> AsyncIterator[Any]:
    """Yield a streaming call's chunks; its final reply is appended to ``replies`` (a failure
    reply raises its typed error)."""
    rid, pending = ch.start_request(command, args, stream=True, session_id=session_id)
    assert pending.chunks is not None
    deadline = None if timeout is None else time.monotonic() + timeout
    done = False
    try:
        while True:
            get = asyncio.ensure_future(pending.chunks.get())
            waiters: set[asyncio.Future[Any]] = {get, pending.future}
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            finished, _ = await asyncio.wait(
                waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            if get in finished:
                item = get.result()
                if item is EXITED:
                    break
                yield item
                continue
            get.cancel()
            if pending.future in finished:
                while not pending.chunks.empty():
                    item = pending.chunks.get_nowait()
                    if item is not EXITED:
                        yield item
                done = True
                reply = pending.future.result()
                ch.result(reply)  # a failure raises here
                if replies is not None:
                    replies.append(reply)
                return
            await cancel_call(ch, rid, command, cancel_grace)
            raise CallTimeoutError(
                f"stream {ch.bridge}:{command} on worker {ch.worker_id} ran past its "
                f"{timeout:g}s timeout",
                worker_id=ch.worker_id,
            )
        if pending.future.done() and not pending.future.cancelled():
            pending.future.result()  # raises the crash error
        raise ch.crash_error(f"stream {command!r}")
    finally:
        if not done and rid in ch.pending:
            # The consumer stopped early (break / cancellation): stop the worker too.
            with contextlib.suppress(MLBridgeError):
                await cancel_call(ch, rid, command, cancel_grace)
