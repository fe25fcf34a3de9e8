"""The asyncio API's fast path: a plain call on an idle worker, ended without suspending.

Theory of operation
-------------------
Runs on the host's loop thread, the owner of pool state. :meth:`LoopDirectCalls.call_now` takes
a plain call (no session, no call-back, no trace span) on a ready pool with an idle, up-to-date
worker (:meth:`DirectCalls.begin_direct`), writes the request and reads the worker's output once,
synchronously. On one CPU the worker has usually answered while the request was written (the
woken reader preempts the writer), so the call ends there: no task switch, no loop iteration, no
:class:`~.callpath.Call`. Otherwise ``call_now`` returns a coroutine that awaits the reply under
the one call policy (:func:`.calls.wait_reply`: with CPUs to spare it polls the output for a
moment first; timeout, cancel, grace, kill; a caller who gives up leaves the worker to the pool
until its call has answered). Either way the worker goes back
through :meth:`Pool.release` and the call is counted (``record``). At most
:data:`~.calls.MAX_STREAK` calls in a row end without suspending, so the loop's other tasks,
I/O and timers still run while a caller loops over calls. Anything else — no idle worker, a call
that never reached its worker, a reply naming a host-owned resource the worker lacks — returns
:data:`NOT_DIRECT` and goes through the host's call path (``Host.execute``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..errors import MLBridgeError, WorkerCrashedError
from .calls import MANY_CPUS, end_streak, streak_open, wait_reply
from .direct import DirectCalls
from .pool_core import NOT_DIRECT

if TYPE_CHECKING:
    from .pending import Pending
    from .pool_core import Worker
    from .result_cache import CacheKey

__all__ = ["LoopDirectCalls"]

_clock = time.perf_counter


class LoopDirectCalls(DirectCalls):
    """The pool's loop-thread fast path (see the module docstring)."""

    def call_now(
        self, command: str, args: dict[str, Any], timeout: float | None, cache: bool = True
    ) -> Any:
        """Loop thread: the call's result, a coroutine that awaits it (its reply was not there
        yet), or :data:`NOT_DIRECT` (run it through ``Host.execute``)."""
        if not streak_open():
            return NOT_DIRECT  # (the host's path awaits, so the loop gets its turn)
        worker, key, value = self.begin_direct(command, args, cache)
        if worker is None:
            return value
        ch = worker.channel
        t0 = _clock()
        try:
            rid, pending = ch.start_plain_request(command, args)
        except WorkerCrashedError as exc:
            self.release(worker, ok=False)
            if exc.details.get("undelivered"):
                return NOT_DIRECT  # its input was gone: the host's path runs it elsewhere
            raise
        except MLBridgeError as exc:  # too large, not encodable: nothing was written
            self.release(worker, ok=False)
            self.record(self.name, command, _clock() - t0, False, ch.worker_id, exc.code, None, 0.0)
            raise
        got = ch.read_reply_now(rid, pending)
        if type(got) is dict:
            end_streak()
            return self._end_now(worker, command, got, t0, key)
        if pending.reply is not None:  # (routed with other output it read)
            end_streak()
            return self._end_now(worker, command, pending.reply, t0, key)
        # not there yet: await it as a loop call (the loop's reader settles its future)
        return self._await_now(worker, rid, ch.awaitable(rid, pending), command, timeout, t0, key)

    async def _await_now(
        self,
        worker: Worker,
        rid: int,
        pending: Pending,
        command: str,
        timeout: float | None,
        t0: float,
        key: CacheKey | None,
    ) -> Any:
        opts = self.cfg.options
        limit = opts.timeout if timeout is None else timeout
        code: str | None = None
        try:
            reply = await wait_reply(
                # (with CPUs to spare, wait_reply polls for a moment before sleeping: a worker
                # on another CPU answers faster than the loop wakes from epoll)
                worker.channel,
                rid,
                pending,
                command,
                limit,
                opts.cancel_grace,
                look=MANY_CPUS,
            )
        except WorkerCrashedError as exc:
            self.release(worker, ok=False)
            if exc.details.get("undelivered"):
                return NOT_DIRECT  # nothing ran: the host's path runs it on a live worker
            code = exc.code
            self.record(self.name, command, _clock() - t0, False, worker.id, code, None, 0.0)
            raise
        except BaseException as exc:  # a timeout; or cancelled: the pool keeps the worker
            self.release(worker, ok=False)  # (until the abandoned call stops, see release)
            code = exc.code if isinstance(exc, MLBridgeError) else None
            self.record(self.name, command, _clock() - t0, False, worker.id, code, None, 0.0)
            raise
        return self._end_now(worker, command, reply, t0, key)

    def _end_now(
        self,
        worker: Worker,
        command: str,
        reply: dict[str, Any],
        t0: float,
        key: CacheKey | None,
    ) -> Any:
        """Loop thread: a direct call's reply is in: its result (or typed error), the worker
        released, the call counted."""
        if reply.get("error_code") == "resource_not_found":
            # The host's path builds the resource it names, then runs the call (and counts it,
            # once): hand the worker back without counting this attempt.
            self._after_call(worker)
            return NOT_DIRECT
        ok = False
        code: str | None = None
        try:
            result = self.result_of(worker, reply)
            if key is not None:
                self.result_cache.keep(key, reply, result)
            ok = True
            return result
        except MLBridgeError as exc:
            code = exc.code
            raise
        finally:
            self.release(worker, ok=ok)
            self.record(self.name, command, _clock() - t0, ok, worker.id, code, None, 0.0)
