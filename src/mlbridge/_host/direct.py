"""The blocking API's fast path: one call on an idle worker, driven from the caller's thread.

Theory of operation
-------------------
:meth:`Pool.call_direct` takes an idle, up-to-date worker of a ready pool under the pool's lock
(:meth:`DirectCalls.begin_direct`, shared with the loop's :mod:`.loop_direct`) and hands it to
:func:`run_direct` on the caller's thread. That thread registers the call, writes the request
and reads the reply itself: with the transport's output held, it reads the output once at once
(:meth:`~.channel_writes.ChannelWrites.read_reply_now`: on one CPU the worker has usually
answered while the request was written, and the reply is taken whole), then, if need be, waits
for it in :func:`.caller_thread.read_held`; the reply wakes only this thread, never the loop.
Without a held output it polls for a moment, then waits on the call's ``SyncPending``, which
the loop thread settles when it reads the reply. Everything that is not this simple case — a
pool that is not ready, a worker that needs bridge-wide state or a resource delete first,
sessions, waiting for a worker, recycling — goes through the loop, and so does the release
whenever the pool's policy has anything to decide (:meth:`Pool.release`). A call that
times out is cancelled, then its worker is killed after ``cancel_grace``; a caller interrupted
(Ctrl-C) leaves the worker to the loop, which hands it out again only once the call stopped.
Off the loop thread run only this module, :mod:`.caller_thread`, the channel's writing side and
read (``_wlock``), the connection's ``plain_request`` (for a worker the thread has checked out)
and the transport's locked reads, each under the lock its docstring names."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import MLBridgeError, WorkerCrashedError
from .caller_thread import end_hold, poll_reply, read_held
from .calls import MANY_CPUS, timeout_error
from .channel import WorkerChannel
from .pending import SyncPending
from .pool_core import NOT_DIRECT, PoolCore
from .result_cache import CacheKey
from .tracecontext import ACTIVE_TRACER

if TYPE_CHECKING:
    from .pool_core import Worker

__all__ = ["DIRECT_SPIN_S", "DirectCalls", "run_direct"]

DIRECT_SPIN_S = 200e-6  # a direct call polls for its reply this long before sleeping
_clock = time.perf_counter


class DirectCalls(PoolCore):
    """The pool's caller-thread entry points (see the module docstring)."""

    def call_direct(
        self, command: str, args: dict[str, Any], timeout: float | None, cache: bool = True
    ) -> Any:
        """Caller thread (``MLBridge``): run a call on an idle, up-to-date worker of a ready
        pool without a hop through the loop; :data:`NOT_DIRECT` when there is none (the caller
        then submits the call to the loop). The thread writes the request and reads the
        reply itself (see the module docstring)."""
        worker, key, value = self.begin_direct(command, args, cache)
        if worker is None:
            return value
        return run_direct(self, worker, command, args, timeout, key)

    def begin_direct(
        self, command: str, args: dict[str, Any], cache: bool
    ) -> tuple[Worker | None, CacheKey | None, Any]:
        """Either thread: the start of a direct call (this one or the loop's ``call_now``):
        ``(worker, cache key, None)`` with an idle, up-to-date worker of a ready pool checked
        out, else ``(None, None, the cached result or NOT_DIRECT)``."""
        if self.state != "ready" or ACTIVE_TRACER[0] is not None:  # call_tracer(), inlined
            return None, None, NOT_DIRECT  # traced calls take the loop's path (Call's span)
        key = None
        if cache and self.result_cache.enabled:
            key = self.result_cache.key(command, args, self.bridge_state.version)
            if key is not None:
                # a miss is counted once this call runs here (the loop's path counts its own)
                hit, value = self.result_cache.get(key, count_miss=False)
                if hit:
                    return None, None, value
        idle = self.idle
        with self.lock:
            worker = None
            while idle:
                w = idle.popleft()
                if w.channel.alive:
                    worker = w
                    break
            if worker is None:
                return None, None, NOT_DIRECT
            if worker.pending_deletes or worker.state_version < self.bridge_state.version:
                idle.appendleft(worker)  # it needs an update first (needs_update): the loop's
                return None, None, NOT_DIRECT
            worker.busy = True
        if key is not None:
            self.result_cache.count_miss()
        return worker, key, None

    def adopt_abandoned(self, worker: Worker, settled: Callable[[], bool], command: str) -> None:
        """Loop thread: a direct call's caller gave up (Ctrl-C) while the call still runs:
        hand the worker out only once it answered the cancel, else kill it after the grace."""
        self._background(self._settle_abandoned(worker, settled, command))

    async def _settle_abandoned(
        self, worker: Worker, settled: Callable[[], bool], command: str
    ) -> None:
        grace = self.cfg.options.cancel_grace
        deadline = time.monotonic() + grace
        # the caller thread settles a SyncPending (a lock, not a loop future): poll it
        while not settled() and worker.alive and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        if not settled() and worker.alive:
            worker.channel.kill(
                f"its caller gave up on {command!r} and the call did not stop within "
                f"{grace:g}s of a cancel"
            )
        self.release(worker, ok=False)


def run_direct(
    pool: DirectCalls,
    worker: Worker,
    command: str,
    args: dict[str, Any],
    timeout: float | None,
    cache_key: CacheKey | None = None,
) -> Any:
    opts = pool.cfg.options
    channel = worker.channel
    limit = opts.timeout if timeout is None else timeout
    t0 = _clock()
    ok = False
    code: str | None = None
    handed_over = False
    try:
        transport = channel.transport
        held = transport is not None and transport.hold_output()
        try:
            rid, pending = channel.start_sync_request(command, args)
        except BaseException:
            if held:
                end_hold(channel, settled=False)
            raise
        try:
            try:
                if held:
                    assert transport is not None
                    channel.held_call = (rid, pending)  # its reply is taken as it is read
                    # On one CPU the worker has usually answered while we wrote (the woken
                    # reader preempts the writer): one read takes the reply.
                    got = channel.read_reply_now(rid, pending)  # (a reply it takes: .reply)
                    if type(got) is not dict and got != 0 and pending.reply is None:
                        read_held(transport, pending, limit, DIRECT_SPIN_S if MANY_CPUS else 0.0)
                elif MANY_CPUS:
                    poll_reply(channel, pending, min(DIRECT_SPIN_S, limit))
            finally:
                if held:
                    channel.held_call = None
                    # parked when this thread read its reply and nothing else awaits output
                    end_hold(channel, settled=pending.reply is not None)
            if (
                pending.reply is None  # (taken on held output: its lock is never released)
                and not pending.wait(max(0.0, limit - (_clock() - t0)))
            ):
                _timed_out(pool, channel, rid, pending, command, opts.cancel_grace)
                raise timeout_error(channel, command, limit)
        except MLBridgeError:
            raise
        except BaseException:  # KeyboardInterrupt: the call may still run in the worker
            channel.send_cancel(rid)
            handed_over = True
            pool.loop.call_soon_threadsafe(
                pool.adopt_abandoned,
                worker,
                lambda: pending.reply is not None or pending.error is not None,
                command,
            )
            raise
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        reply = pending.reply
        if reply.get("error_code") == "resource_not_found":
            return NOT_DIRECT  # the loop's path builds a host-owned resource it names, then runs
        if "bridge_state" in reply or "resource_states" in reply:
            # recorded on the loop before this call returns: the next call sees it everywhere
            result = _on_loop(pool, lambda: pool.result_of(worker, reply))
        else:
            result = reply.get("result") if reply.get("success") else WorkerChannel.result(reply)
            if cache_key is not None:
                pool.result_cache.keep(cache_key, reply, result)
        ok = True
        return result
    except WorkerCrashedError as exc:
        code = exc.code
        if exc.details.get("undelivered"):
            return NOT_DIRECT  # nothing ran: the loop runs it on a live worker
        raise
    except MLBridgeError as exc:
        code = exc.code
        raise
    finally:
        if not handed_over:
            pool.release(worker, ok=ok, caller_thread=True)
        pool.record_threadsafe(pool.name, command, _clock() - t0, ok, channel.worker_id, code)


def _timed_out(
    pool: DirectCalls,
    channel: WorkerChannel,
    rid: int,
    pending: SyncPending,
    command: str,
    grace: float,
) -> None:
    channel.send_cancel(rid)
    if pending.wait(grace):
        return
    channel.pending.pop(rid, None)
    channel.doomed = True  # never handed out again, even before the kill lands
    reason = f"it did not stop {command!r} within {grace:g}s of a cancel"
    pool.loop.call_soon_threadsafe(channel.kill, reason)


def _on_loop(pool: DirectCalls, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the loop thread (it touches loop-owned state) and wait for it."""
    done = threading.Event()
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)
            raise
        finally:
            done.set()

    pool.loop.call_soon_threadsafe(run)
    done.wait()
    if box and isinstance(box[0], BaseException):
        raise box[0]
    return box[0] if box else None
