"""A supervised pool of workers for one bridge.

Theory of operation
-------------------
The pool's state (its :class:`Worker` list, the idle deque, the waiters, the counters) is owned
by the host's event loop, with one exception stated here: the blocking API's fast path,
:meth:`Pool.call_direct`, runs on a caller thread and takes an idle worker and gives it back
under ``lock``; every other change to ``idle`` and the counters also happens under ``lock``, and
nothing else runs off the loop. Decisions (grow, recycle, retire, replace, mark broken) are the
pure functions of :mod:`.policy`, so each rule is written once.

* ``checkout`` hands out an idle worker (the preferred one when it is idle: session affinity),
  else queues the caller FIFO, growing the pool when the policy allows; it fails with
  :class:`CheckoutTimeoutError` after ``checkout_timeout``. ``bring_up_to_date`` then sends the
  worker what it lacks (queued resource deletes, bridge-wide state).
* ``release`` counts the call and hands the worker to the next waiter or back to the idle list,
  or retires it when the policy says so. A worker whose caller gave up while its call still runs
  (asyncio cancellation, Ctrl-C) is not handed out again until that call has answered the cancel;
  if it does not within ``cancel_grace`` it is killed and replaced.
* One **supervisor task** starts replacement workers (with backoff after crashes), sends
  heartbeats to every worker (the worker's control thread answers while its main thread works;
  no answer within ``heartbeat_timeout`` -> killed and replaced), recycles and retires idle
  overflow workers. Consecutive boot failures reach ``max_boot_failures`` -> the pool is
  **broken**: every waiter and later call fails with :class:`BridgeBrokenError` and the boot error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from ..config import BridgeConfig
from ..errors import BridgeUnavailableError, CallbackError, CheckoutTimeoutError
from . import policy
from .loop_direct import LoopDirectCalls
from .placement import worker_location
from .pool_core import NOT_DIRECT, Worker
from .stats import PoolStatistics, WorkerStatistics
from .supervisor import PoolSupervisor, rss_of

__all__ = ["NOT_DIRECT", "Pool", "Worker"]


class Pool(PoolSupervisor, LoopDirectCalls):
    """A supervised pool of workers for one bridge (the module docstring tells how)."""

    async def ensure_started(self) -> None:
        if self.state == "ready" and self.workers:
            return
        if self.state == "broken":
            raise self._broken_error()
        if self.state == "closed":
            raise BridgeUnavailableError(f"bridge {self.name!r} is closed")
        async with self._start_lock:
            if self.state == "idle":
                if self._preflight is not None:
                    await self._preflight(self.cfg)
                self._loop = asyncio.get_running_loop()
                self.state = "starting"
                self.started_at = time.time()
                self._supervisor = self._loop.create_task(
                    self._supervise(), name=f"mlbridge-supervisor-{self.name}"
                )
                await asyncio.gather(
                    *(self._spawn_worker() for _ in range(max(self.cfg.pool_size, 1)))
                )
        if not self.workers:
            # Keep waiting while the supervisor retries boots; broken wakes us too.
            await self._ready.wait()
        if self.state == "broken":
            raise self._broken_error()

    def _take_idle(self, prefer: str | None) -> Worker | None:
        """Under ``lock``: the preferred idle worker, else the first live one."""
        if prefer is not None:
            for w in self.idle:
                if w.id == prefer and w.alive:
                    self.idle.remove(w)
                    w.busy = True
                    return w
        while self.idle:
            w = self.idle.popleft()
            if w.channel.alive:
                w.busy = True
                return w
        return None

    async def checkout(
        self,
        timeout: float | None = None,
        *,
        prefer: str | None = None,
        caller: Worker | None = None,
    ) -> Worker:
        if self.state != "ready" or not self.workers:
            await self.ensure_started()
        with self.lock:
            w = self._take_idle(prefer)
        if w is not None:
            return w
        if self.state == "broken":
            raise self._broken_error()
        grow = policy.growth(self._counts())
        if grow is not None:
            self.starting += 1
            self._background(self._spawn_worker(overflow=grow == "overflow", counted=True))
        elif caller is not None and all(x.waiting_on_callbacks for x in self.workers if x.busy):
            raise CallbackError(
                f"deadlock avoided: every worker of {self.name!r} is waiting on a call back "
                f"through the host (worker {caller.id} called {self.name!r} itself) and the pool "
                f"cannot grow (pool_size={self.cfg.pool_size}, overflow={self.cfg.overflow}). "
                "Raise pool_size or overflow for this bridge.",
                bridge=self.name,
            )
        timeout = self.cfg.options.checkout_timeout if timeout is None else timeout
        fut: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        with self.lock:
            # A caller thread may have returned a worker since the first look: look again, and
            # queue atomically with that look (call_direct checks waiters under the lock).
            w = self._take_idle(None)
            if w is not None:
                return w
            self.waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.CancelledError:
            # Cancelled just as a worker was handed to us: pass it on rather than leak it.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._hand_out(fut.result())
            raise
        except TimeoutError:
            raise CheckoutTimeoutError(
                f"no free worker of {self.name!r} within {timeout:g}s: all "
                f"{len(self.workers)} are busy (pool_size={self.cfg.pool_size}, "
                f"overflow={self.cfg.overflow}). Raise pool_size/overflow or checkout_timeout, "
                "or send fewer concurrent calls.",
                bridge=self.name,
            ) from None
        finally:
            if not fut.done():
                fut.cancel()
            if fut.cancelled():  # still queued (a handed-out future was already popped)
                with self.lock, contextlib.suppress(ValueError):
                    self.waiters.remove(fut)

    def statistics(self) -> PoolStatistics:
        now = time.monotonic()
        workers = []
        for w in self.workers:
            rss = rss_of(w.pid) or w.rss_bytes
            workers.append(
                WorkerStatistics(
                    id=w.id,
                    pid=w.pid if w.pid is not None else worker_location(w.channel)[1],
                    busy=w.busy,
                    overflow=w.overflow,
                    requests=w.requests,
                    errors=w.errors,
                    rss_bytes=rss,
                    uptime=now - w.ready_at,
                    resources=len(w.resources),
                    node=worker_location(w.channel)[0],
                    backend=self.cfg.options.backend,
                )
            )
        return PoolStatistics(
            name=self.name,
            state=self.state,
            pool_size=self.cfg.pool_size,
            overflow=self.cfg.overflow,
            workers=tuple(workers),
            idle_workers=len(self.idle),
            waiting_callers=len(self.waiters),
            requests=self.total_requests,
            errors=self.total_errors,
            restarts=self.restarts,
            boot_error=self.boot_error,
            uptime=(time.time() - self.started_at) if self.started_at else 0.0,
            backend=self.cfg.options.backend,
            bridge_state_keys=tuple(self.bridge_state.keys()),
            starting_workers=self.starting,
            cache=self.result_cache.statistics(),
        )

    @staticmethod
    def idle_statistics(cfg: BridgeConfig) -> PoolStatistics:
        """The statistics of a bridge whose pool was never started."""
        return PoolStatistics(
            name=cfg.name,
            state="idle",
            pool_size=cfg.pool_size,
            overflow=cfg.overflow,
            workers=(),
            idle_workers=0,
            waiting_callers=0,
            requests=0,
            errors=0,
            restarts=0,
            boot_error=None,
            uptime=0.0,
            backend=cfg.options.backend,
        )

    async def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self._wake.set()
        self._fail_waiters(BridgeUnavailableError(f"bridge {self.name!r} was closed"))
        self._ready.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for task in list(self._tasks):
            task.cancel()
        timeout = self.cfg.options.shutdown_timeout
        for w in self.workers:
            w.channel.closing_reason = "the host is closing"
            w.channel.fail_calls(
                BridgeUnavailableError(
                    f"the call on worker {w.id} of {self.name!r} was stopped because the host is "
                    "closing (close() was called while it was in flight); close the bridge only "
                    "after its calls have returned"
                )
            )
        await asyncio.gather(
            *(w.channel.close(timeout) for w in list(self.workers)), return_exceptions=True
        )
        self.workers.clear()
        self.idle.clear()
        if self._backend_name() == "fork":  # its warm template goes with the pool
            from .._backends.fork import close_templates

            close_templates(self.name, asyncio.get_running_loop())
