"""A supervised pool of workers for one bridge.

Theory of operation
-------------------
Everything here runs on the host's event loop thread; the loop is the lock. The pool owns its
:class:`Worker` objects (a :class:`WorkerChannel` plus bookkeeping) and one **supervisor task**,
which is the only code that starts replacement workers, sends heartbeats, recycles and retires.
Callers only ``checkout`` and ``release``.

* Checkout hands out an idle worker (the caller's preferred one when it is idle: session
  affinity), otherwise queues the caller FIFO, growing the pool by one overflow worker when
  allowed, and fails with :class:`CheckoutTimeoutError` after ``checkout_timeout``.
* Release hands the worker to the next waiter, or back to the idle list; a worker due for
  recycling (``max_requests``, ``max_memory``, ``max_age``) is retired instead and the
  supervisor starts a fresh one.
* A worker that exits is dropped at once (its in-flight call fails in the channel); the
  supervisor restarts core workers with exponential backoff. Consecutive boot failures (exit or
  no ``hello`` before ``startup_timeout``) reach ``max_boot_failures`` -> the pool is **broken**:
  every waiter and every later call fails with :class:`BridgeBrokenError` carrying the boot error.
* Heartbeats go to every worker, busy or not (the worker's control thread answers them while
  the main thread works). No answer within ``heartbeat_timeout`` -> the worker is killed and
  replaced. Heartbeat replies carry RSS, which drives ``max_memory`` recycling.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .._backends import get_backend
from .._protocol.exit_codes import BOOT_FAILURE_CODES
from ..config import BridgeConfig
from ..errors import (
    BridgeBrokenError,
    BridgeUnavailableError,
    CallbackError,
    CheckoutTimeoutError,
    MLBridgeError,
)
from .channel import CallbackHandler, WorkerChannel
from .registry import worker_environment
from .telemetry import Emitter, HealthEvent, WorkerEvent

__all__ = ["Pool", "Worker"]


@dataclass(eq=False)
class Worker:
    channel: WorkerChannel
    overflow: bool = False
    busy: bool = False
    ready_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    requests: int = 0
    errors: int = 0
    rss_bytes: int = 0
    recycle_reason: str | None = None
    # resource id -> version of the host record this worker's live copy was built from
    resources: dict[str, int] = field(default_factory=dict)
    pending_deletes: set[str] = field(default_factory=set)
    waiting_on_callbacks: int = 0

    @property
    def id(self) -> str:
        return self.channel.worker_id

    @property
    def pid(self) -> int | None:
        return self.channel.pid

    @property
    def alive(self) -> bool:
        return self.channel.alive


class Pool:
    def __init__(
        self,
        cfg: BridgeConfig,
        *,
        on_callback: CallbackHandler,
        emit: Emitter,
        preflight: Callable[[BridgeConfig], Awaitable[None]] | None = None,
        register_pid: Callable[[int], None] = lambda pid: None,
        unregister_pid: Callable[[int], None] = lambda pid: None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.log = logging.getLogger(f"mlbridge.pool.{cfg.name}")
        self._on_callback = on_callback
        self._preflight = preflight
        self._emit = emit
        self._register_pid = register_pid
        self._unregister_pid = unregister_pid
        self.state = "idle"  # idle -> starting -> ready | broken; closed
        self.workers: list[Worker] = []
        self.idle: deque[Worker] = deque()
        # Guards ``idle``, ``waiters`` membership and the counters: MLBridge's direct path takes
        # and returns idle workers from caller threads (see take_idle_threadsafe).
        self.lock = threading.Lock()
        self.waiters: deque[asyncio.Future[Worker]] = deque()
        self.starting = 0  # workers being spawned right now
        self.boot_failures = 0
        self.crash_streak = 0
        self.boot_error: str | None = None
        self.restarts = 0
        self.total_requests = 0
        self.total_errors = 0
        self.started_at: float | None = None
        self._ids = itertools.count(1)
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._start_lock = asyncio.Lock()
        self._spawn_tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ start / stop
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
                self.state = "starting"
                self.started_at = time.time()
                self._supervisor = asyncio.get_running_loop().create_task(
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

    def _broken_error(self) -> BridgeBrokenError:
        return BridgeBrokenError(
            f"bridge {self.name!r} is broken: its workers failed to boot "
            f"{self.boot_failures} times in a row. Last boot error: {self.boot_error}. "
            "Fix the bridge (run `mlbridge doctor`), then restart it with "
            "start_bridge/update_config.",
            bridge=self.name,
        )

    def _env(self) -> dict[str, str]:
        env = worker_environment(self.cfg)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    async def _spawn_worker(
        self, *, overflow: bool = False, counted: bool = False
    ) -> Worker | None:
        """Start one worker and wait for its hello. Returns None on failure (counted).

        ``counted``: the caller already added this start to ``self.starting`` (so that several
        checkouts in the same tick do not all decide to grow the pool).
        """
        if not counted:
            self.starting += 1
        wid = f"{self.name}-{next(self._ids)}"
        channel = WorkerChannel(
            bridge=self.name,
            worker_id=wid,
            argv=self.cfg.worker_argv(wid, os.getpid()),
            env=self._env(),
            max_frame_bytes=self.cfg.options.max_frame_bytes,
            on_callback=self._on_callback,
            on_exit=self._on_channel_exit,
            backend=get_backend(self.cfg.options.backend),
            logger=logging.getLogger(f"mlbridge.worker.{self.name}"),
        )
        opts = self.cfg.options
        try:
            try:
                await channel.spawn()
            except OSError as exc:
                self._boot_failed(wid, f"cannot start {self.cfg.python!r}: {exc}")
                return None
            assert channel.pid is not None
            self._register_pid(channel.pid)
            self._emit(WorkerEvent(self.name, wid, channel.pid, "started"))
            try:
                await channel.handshake(opts.codec, opts.startup_timeout)
            except asyncio.CancelledError:
                channel.kill("the pool closed while it was starting")
                raise
            except (MLBridgeError, TimeoutError) as exc:
                if channel.alive:
                    channel.kill("no hello before startup_timeout")
                    await channel.exited
                boot = channel.boot_error.get("error") if channel.boot_error else None
                tail = "\n".join(list(channel.stderr_tail)[-8:])
                why = boot or (
                    f"{channel.exit_info().describe()} before answering hello"
                    + (
                        f" within startup_timeout={opts.startup_timeout:g}s"
                        if channel.returncode is None or channel.kill_reason
                        else ""
                    )
                    + (f"; stderr: {tail}" if tail else f"; {exc}")
                )
                self._boot_failed(wid, why, channel.returncode)
                return None
        finally:
            self.starting -= 1
        if self.state in ("closed", "broken"):
            await channel.close(opts.shutdown_timeout)
            return None
        if not overflow and sum(1 for w in self.workers if not w.overflow) >= max(
            self.cfg.pool_size, 1
        ):
            overflow = True  # the pool filled up meanwhile: this one retires when idle
        worker = Worker(channel, overflow=overflow)
        self.workers.append(worker)
        self.boot_failures = 0
        self.state = "ready"
        self._ready.set()
        self._emit(WorkerEvent(self.name, wid, channel.pid, "ready"))
        self.log.debug("worker %s ready (pid %s)", wid, channel.pid)
        self._hand_out(worker)
        return worker

    def _boot_failed(self, wid: str, why: str, returncode: int | None = None) -> None:
        self.boot_failures += 1
        self.boot_error = why
        self._emit(
            WorkerEvent(self.name, wid, None, "boot_failed", reason=why, exit_code=returncode)
        )
        self.log.error(
            "worker %s of %r failed to boot (%d/%d): %s",
            wid,
            self.name,
            self.boot_failures,
            self.cfg.options.max_boot_failures,
            why,
        )
        definitive = returncode in BOOT_FAILURE_CODES
        if self.boot_failures >= self.cfg.options.max_boot_failures or (
            definitive and self.boot_failures >= 2
        ):
            self._mark_broken()
        else:
            self._wake.set()

    def _mark_broken(self) -> None:
        if self.state == "broken":
            return
        self.state = "broken"
        self._emit(WorkerEvent(self.name, "-", None, "broken", reason=self.boot_error))
        err = self._broken_error()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
        self._ready.set()

    def _on_channel_exit(self, channel: WorkerChannel) -> None:
        if channel.pid is not None:
            self._unregister_pid(channel.pid)
        worker = next((w for w in self.workers if w.channel is channel), None)
        if worker is None:
            return  # died during boot: _spawn_worker accounts for it
        self.workers.remove(worker)
        with self.lock, contextlib.suppress(ValueError):
            self.idle.remove(worker)
        if channel.closing:
            self._emit(
                WorkerEvent(
                    self.name,
                    worker.id,
                    channel.pid,
                    "stopped",
                    reason=channel.kill_reason or worker.recycle_reason,
                )
            )
            return
        reason = channel.kill_reason or channel.exit_info().describe()
        self.log.warning("worker %s of %r %s", worker.id, self.name, channel.exit_info().describe())
        self._emit(
            WorkerEvent(
                self.name,
                worker.id,
                channel.pid,
                "exited",
                reason=reason,
                exit_code=channel.returncode,
            )
        )
        if not worker.overflow:
            self.crash_streak += 1
        self._wake.set()

    # ------------------------------------------------------------------ checkout / release
    def _take_idle_locked(self) -> Worker | None:
        while self.idle:
            w = self.idle.popleft()
            if w.alive:
                w.busy = True
                return w
        return None

    def _take_idle(self, prefer: str | None) -> Worker | None:
        with self.lock:
            if prefer is not None:
                for w in self.idle:
                    if w.id == prefer and w.alive:
                        self.idle.remove(w)
                        w.busy = True
                        return w
            return self._take_idle_locked()

    def take_idle_threadsafe(self) -> Worker | None:
        """Caller thread: an idle, ready worker with nothing queued for it, or None."""
        if self.state != "ready":
            return None
        with self.lock:
            while self.idle:
                w = self.idle.popleft()
                if not w.alive:
                    continue
                if w.pending_deletes:
                    self.idle.appendleft(w)
                    return None
                w.busy = True
                return w
            return None

    def release_threadsafe(self, worker: Worker, ok: bool) -> bool:
        """Caller thread: put ``worker`` back when nothing else is due (no waiter to hand it
        to, no recycling, still alive); return False to have the loop release it instead."""
        opts = self.cfg.options
        with self.lock:
            if (
                self.waiters
                or not worker.alive
                or worker.recycle_reason is not None
                or self.state != "ready"
                or (opts.max_requests and worker.requests + 1 >= opts.max_requests)
                or opts.max_age
            ):
                return False
            self._count(worker, ok)
            worker.busy = False
            self.idle.append(worker)
            return True

    def _count(self, worker: Worker, ok: bool) -> None:
        worker.last_used = time.monotonic()
        worker.requests += 1
        self.total_requests += 1
        if not ok:
            worker.errors += 1
            self.total_errors += 1
        elif not worker.overflow:
            self.crash_streak = 0

    def _capacity(self) -> int:
        return max(self.cfg.pool_size, 1) + self.cfg.overflow

    async def checkout(
        self,
        timeout: float | None = None,
        *,
        prefer: str | None = None,
        caller: Worker | None = None,
    ) -> Worker:
        if self.state != "ready" or not self.workers:
            await self.ensure_started()
        w = self._take_idle(prefer)
        if w is not None:
            return w
        if self.state == "broken":
            raise self._broken_error()
        if len(self.workers) + self.starting < self._capacity():
            self._start_background(
                overflow=len(self.workers) + self.starting >= max(self.cfg.pool_size, 1)
            )
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
            # A caller thread may have returned a worker since _take_idle: look once more, and
            # queue atomically with that look (release_threadsafe checks waiters under the lock).
            w = self._take_idle_locked()
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

    def _hand_out(self, worker: Worker) -> None:
        """Give a free worker to the first live waiter, else make it idle."""
        with self.lock:
            while self.waiters:
                fut = self.waiters.popleft()
                if not fut.done():
                    worker.busy = True
                    fut.set_result(worker)
                    return
            worker.busy = False
            self.idle.append(worker)

    def release(self, worker: Worker, *, ok: bool = True) -> None:
        with self.lock:
            self._count(worker, ok)
        if not worker.alive:
            worker.busy = False
            return
        opts = self.cfg.options
        if worker.recycle_reason is None:
            if opts.max_requests and worker.requests >= opts.max_requests:
                worker.recycle_reason = f"served max_requests={opts.max_requests}"
            elif opts.max_age and time.monotonic() - worker.ready_at >= opts.max_age:
                worker.recycle_reason = f"older than max_age={opts.max_age:g}s"
        if worker.recycle_reason is not None:
            worker.busy = False
            self._retire(worker, worker.recycle_reason, event="recycled")
            return
        self._hand_out(worker)

    def _retire(self, worker: Worker, reason: str, *, event: str) -> None:
        with self.lock, contextlib.suppress(ValueError):
            self.idle.remove(worker)
        if worker in self.workers:
            self.workers.remove(worker)
        self._emit(WorkerEvent(self.name, worker.id, worker.pid, event, reason=reason))
        self.log.info("%s worker %s: %s", event, worker.id, reason)
        worker.channel.kill_reason = reason
        self._background(worker.channel.close(self.cfg.options.shutdown_timeout))
        self._wake.set()

    def _background(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._spawn_tasks.add(task)
        task.add_done_callback(self._spawn_tasks.discard)

    def _start_background(self, *, overflow: bool) -> None:
        self.starting += 1
        self._background(self._spawn_worker(overflow=overflow, counted=True))

    # ------------------------------------------------------------------ supervisor
    async def _supervise(self) -> None:
        opts = self.cfg.options
        last_health = time.monotonic()
        backoff = opts.restart_backoff
        while self.state not in ("closed", "broken"):
            tick = opts.health_check_interval if opts.health_check_interval > 0 else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(tick, 1.0))
            self._wake.clear()
            if self.state in ("closed", "broken"):
                break
            if self._missing() > 0 and self.state in ("ready", "starting"):
                delay = backoff if (self.crash_streak or self.boot_failures) else 0.0
                if delay:
                    await asyncio.sleep(delay)
                    backoff = min(backoff * 2, opts.max_restart_backoff)
                else:
                    backoff = opts.restart_backoff
                if self.state in ("closed", "broken"):
                    break
                # Counted again after the pause: a checkout may have started one meanwhile.
                missing = self._missing()
                if missing <= 0:
                    continue
                self.restarts += missing
                await asyncio.gather(*(self._spawn_worker() for _ in range(missing)))
                continue
            now = time.monotonic()
            if opts.health_check_interval > 0 and now - last_health >= opts.health_check_interval:
                last_health = now
                await self._health_round()
            self._retire_idle_overflow(now)

    def _missing(self) -> int:
        """Core workers short of pool_size, counting those being started."""
        core = sum(1 for w in self.workers if not w.overflow)
        return max(self.cfg.pool_size, 1) - core - self.starting

    async def health_check(self) -> None:
        """One heartbeat round now (the supervisor runs one every health_check_interval)."""
        await self._health_round()

    async def _health_round(self) -> None:
        opts = self.cfg.options
        workers = [w for w in self.workers if w.alive]
        results = await asyncio.gather(
            *(
                w.channel.request("heartbeat", {}, timeout=opts.heartbeat_timeout, cancel_grace=0.0)
                for w in workers
            ),
            return_exceptions=True,
        )
        for w, res in zip(workers, results, strict=True):
            if isinstance(res, BaseException):
                if w.alive:
                    self.log.warning("worker %s missed its heartbeat (%s); killing it", w.id, res)
                    w.channel.kill(f"it missed a heartbeat ({opts.heartbeat_timeout:g}s)")
                continue
            w.rss_bytes = int(res.get("rss_bytes", 0))
            self._emit(
                HealthEvent(
                    self.name,
                    w.id,
                    w.pid,
                    w.rss_bytes,
                    int(res.get("active_resources", 0)),
                    bool(res.get("busy")),
                )
            )
            if opts.max_memory and w.rss_bytes > opts.max_memory and w.recycle_reason is None:
                w.recycle_reason = (
                    f"RSS {w.rss_bytes / 1e6:.0f} MB over max_memory={opts.max_memory / 1e6:.0f} MB"
                )
                if not w.busy:
                    self._retire(w, w.recycle_reason, event="recycled")
            if opts.max_age and time.monotonic() - w.ready_at >= opts.max_age and not w.busy:
                w.recycle_reason = f"older than max_age={opts.max_age:g}s"
                self._retire(w, w.recycle_reason, event="recycled")

    def _retire_idle_overflow(self, now: float) -> None:
        with self.lock:
            idle = list(self.idle)
        for w in idle:
            if w.overflow and now - w.last_used >= self.cfg.options.idle_timeout:
                self._retire(
                    w,
                    f"idle overflow worker for {self.cfg.options.idle_timeout:g}s",
                    event="retired",
                )

    async def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self._wake.set()
        err = BridgeUnavailableError(f"bridge {self.name!r} was closed")
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
        self._ready.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for task in list(self._spawn_tasks):
            task.cancel()
        timeout = self.cfg.options.shutdown_timeout
        await asyncio.gather(
            *(w.channel.close(timeout) for w in list(self.workers)), return_exceptions=True
        )
        self.workers.clear()
        self.idle.clear()
