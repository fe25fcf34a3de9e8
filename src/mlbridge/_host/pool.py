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
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .._backends import WorkerSpec, get_backend
from .._protocol.exit_codes import BOOT_FAILURE_CODES
from ..config import BridgeConfig
from ..errors import (
    BridgeBrokenError,
    BridgeUnavailableError,
    CallbackError,
    CheckoutTimeoutError,
    MLBridgeError,
)
from . import policy
from .bridge_state import BridgeState
from .channel import CallbackHandler, WorkerChannel
from .registry import worker_environment
from .stats import PoolStatistics, WorkerStatistics
from .telemetry import Emitter, HealthEvent, WorkerEvent

__all__ = ["NOT_DIRECT", "Pool", "Worker"]

NOT_DIRECT: Any = object()  # call_direct could not take the fast path: submit to the loop


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
    state_version: int = 0  # the BridgeState version this worker applied last

    @property
    def id(self) -> str:
        return self.channel.worker_id

    @property
    def pid(self) -> int | None:
        return self.channel.pid

    @property
    def alive(self) -> bool:
        return self.channel.alive

    def facts(self, now: float) -> policy.WorkerFacts:
        return policy.WorkerFacts(
            self.requests, now - self.ready_at, self.rss_bytes, self.overflow, now - self.last_used
        )


class Pool:
    def __init__(
        self,
        cfg: BridgeConfig,
        *,
        on_callback: CallbackHandler,
        emit: Emitter,
        bridge_state: BridgeState | None = None,
        preflight: Callable[[BridgeConfig], Awaitable[None]] | None = None,
        register_pid: Callable[[int], None] = lambda pid: None,
        unregister_pid: Callable[[int], None] = lambda pid: None,
        emit_threadsafe: Emitter | None = None,
        worker_env: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self._worker_env = dict(worker_env or {})  # the host's reaper token: set last, so it wins
        self.name = cfg.name
        self.log = logging.getLogger(f"mlbridge.pool.{cfg.name}")
        self.bridge_state = bridge_state if bridge_state is not None else BridgeState()
        self._on_callback = on_callback
        self._preflight = preflight
        self._emit = emit
        self.emit_threadsafe = emit_threadsafe or emit
        self._register_pid = register_pid
        self._unregister_pid = unregister_pid
        self.state = "idle"  # idle -> starting -> ready | broken; closed
        self.workers: list[Worker] = []
        self.idle: deque[Worker] = deque()
        self.lock = threading.Lock()  # see the module docstring: idle, waiters, counters
        self.waiters: deque[asyncio.Future[Worker]] = deque()
        self.starting = 0  # workers being started right now
        self.boot_failures = 0
        self.crash_streak = 0
        self.boot_error: str | None = None
        self.restarts = 0
        self.total_requests = 0
        self.total_errors = 0
        self.started_at: float | None = None
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._start_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()

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

    def _broken_error(self) -> BridgeBrokenError:
        return BridgeBrokenError(
            f"bridge {self.name!r} is broken: its workers failed to boot "
            f"{self.boot_failures} times in a row. Last boot error: {self.boot_error}. "
            "Fix the bridge (run `mlbridge doctor`), then restart it with "
            "start_bridge/update_config.",
            bridge=self.name,
        )

    def _spec(self, worker_id: str) -> WorkerSpec:
        cfg, opts = self.cfg, self.cfg.options
        return WorkerSpec(
            bridge=self.name,
            worker_id=worker_id,
            target=cfg.target,
            python=cfg.python,
            env={**worker_environment(cfg), **self._worker_env},
            settings=cfg.settings,
            limits=opts.limits,
            threads=opts.threads,
            codec=opts.codec,
            max_frame_bytes=opts.max_frame_bytes,
            parent_pid=os.getpid(),
        )

    async def _spawn_worker(self, *, overflow: bool = False, counted: bool = False) -> None:
        """Start one worker, wait for its hello, give it the bridge-wide state, hand it out.

        ``counted``: the caller already added this start to ``self.starting`` (so that several
        checkouts in the same tick do not all decide to grow the pool).
        """
        if not counted:
            self.starting += 1
        wid = f"{self.name}-{next(self._ids)}"
        channel = WorkerChannel(
            self._spec(wid),
            get_backend(self.cfg.options.backend),
            on_callback=self._on_callback,
            on_exit=self._on_channel_exit,
            logger=logging.getLogger(f"mlbridge.worker.{self.name}"),
        )
        opts = self.cfg.options
        worker = Worker(channel)
        try:
            try:
                channel.start()
            except OSError as exc:
                self._boot_failed(wid, f"cannot start {self.cfg.python!r}: {exc}")
                return
            if channel.pid is not None:
                self._register_pid(channel.pid)
            self._emit(WorkerEvent(self.name, wid, channel.pid, "started"))
            try:
                await channel.handshake(opts.codec, opts.startup_timeout)
                await self.apply_bridge_state(worker)
            except asyncio.CancelledError:
                channel.kill("the pool closed while it was starting")
                raise
            except (MLBridgeError, TimeoutError) as exc:
                if channel.alive:
                    channel.kill("no hello before startup_timeout")
                    await channel.exited
                self._boot_failed(wid, self._boot_failure_text(channel, exc), channel.returncode)
                return
        finally:
            self.starting -= 1
        if self.state in ("closed", "broken"):
            await channel.close(opts.shutdown_timeout)
            return
        core = sum(1 for w in self.workers if not w.overflow)
        # the pool may have filled up meanwhile: then this one retires when idle
        worker.overflow = overflow or policy.overflow_on_arrival(core, self.cfg.pool_size)
        worker.rss_bytes = _rss(channel.pid)
        worker.ready_at = worker.last_used = time.monotonic()
        self.workers.append(worker)
        self.boot_failures = 0
        self.state = "ready"
        self._ready.set()
        self._emit(WorkerEvent(self.name, wid, channel.pid, "ready"))
        self.log.debug("worker %s ready (pid %s)", wid, channel.pid)
        self._hand_out(worker)

    def _boot_failure_text(self, channel: WorkerChannel, exc: BaseException) -> str:
        boot = channel.boot_error.get("error") if channel.boot_error else None
        if boot:
            return str(boot)
        if isinstance(exc, MLBridgeError) and channel.running and not channel.kill_reason:
            return f"it answered hello with an error: {exc}"
        timeout = self.cfg.options.startup_timeout
        tail = channel.stderr.tail(8)
        return (
            f"{channel.exit_info().describe()} before answering hello"
            + (
                f" within startup_timeout={timeout:g}s"
                if channel.returncode is None or channel.kill_reason
                else ""
            )
            + (f"; stderr: {tail}" if tail else f"; {exc}")
        )

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
        if policy.boot_verdict(self.boot_failures, self.cfg.options.max_boot_failures, definitive):
            self._mark_broken()
        else:
            self._wake.set()

    def _mark_broken(self) -> None:
        if self.state == "broken":
            return
        self.state = "broken"
        self._emit(WorkerEvent(self.name, "-", None, "broken", reason=self.boot_error))
        self._fail_waiters(self._broken_error())
        self._ready.set()

    def _fail_waiters(self, err: MLBridgeError) -> None:
        with self.lock:
            waiters, self.waiters = self.waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(err)

    def _on_channel_exit(self, channel: WorkerChannel) -> None:
        if channel.pid is not None:
            self._unregister_pid(channel.pid)
        worker = self.worker_of(channel)
        if worker is None:
            return  # died during boot: _spawn_worker accounts for it
        self.workers.remove(worker)
        with self.lock, contextlib.suppress(ValueError):
            self.idle.remove(worker)
        if channel.closing:
            reason = channel.kill_reason or worker.recycle_reason
            self._emit(WorkerEvent(self.name, worker.id, channel.pid, "stopped", reason=reason))
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
        self.restarts += 1  # every unexpected exit is replaced (core: supervisor; overflow: demand)
        if not worker.overflow:
            self.crash_streak += 1
        self._wake.set()

    def worker_of(self, channel: WorkerChannel) -> Worker | None:
        return next((w for w in self.workers if w.channel is channel), None)

    # ------------------------------------------------------------------ checkout / release
    def _counts(self) -> policy.PoolCounts:
        core = sum(1 for w in self.workers if not w.overflow)
        return policy.PoolCounts(
            len(self.workers), core, self.starting, self.cfg.pool_size, self.cfg.overflow
        )

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
            if w.alive:
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

    def _count(self, worker: Worker, ok: bool) -> None:
        """Under ``lock``: one call of ``worker`` ended."""
        worker.last_used = time.monotonic()
        worker.requests += 1
        self.total_requests += 1
        if not ok:
            worker.errors += 1
            self.total_errors += 1
        elif not worker.overflow:
            self.crash_streak = 0

    def release(self, worker: Worker, *, ok: bool = True) -> None:
        """Loop thread: a call on ``worker`` ended (see the module docstring)."""
        with self.lock:
            self._count(worker, ok)
        self._after_call(worker)

    def _after_call(self, worker: Worker) -> None:
        if not worker.alive:
            worker.busy = False
            return
        if worker.channel.abandoned:
            self._background(self._release_when_quiet(worker))
            return
        reason = policy.recycle_reason(worker.facts(time.monotonic()), self.cfg.options)
        if reason is not None:
            worker.busy = False
            self._retire(worker, reason, event="recycled")
            return
        if self.needs_update(worker):
            self._background(self._update_then_hand_out(worker))
            return
        self._hand_out(worker)

    async def _release_when_quiet(self, worker: Worker) -> None:
        """A caller gave up on a call still running on ``worker``: hand the worker out only
        once that call has answered its cancel; kill it after cancel_grace otherwise."""
        grace = self.cfg.options.cancel_grace
        ch = worker.channel
        futures = [p.future for p in ch.abandoned.values()]
        if futures:
            await asyncio.wait(futures, timeout=grace)
        if ch.abandoned and worker.alive:
            names = ", ".join(sorted({repr(p.command) for p in ch.abandoned.values()}))
            ch.kill(
                f"its caller gave up on {names} and the call did not stop within {grace:g}s of "
                "a cancel"
            )
        self._after_call(worker)

    def _retire(self, worker: Worker, reason: str, *, event: str) -> None:
        with self.lock, contextlib.suppress(ValueError):
            self.idle.remove(worker)
        if worker in self.workers:
            self.workers.remove(worker)
        self._emit(WorkerEvent(self.name, worker.id, worker.pid, event, reason=reason))
        self.log.info("%s worker %s: %s", event, worker.id, reason)
        worker.recycle_reason = reason
        worker.channel.kill_reason = reason
        self._background(worker.channel.close(self.cfg.options.shutdown_timeout))
        self._wake.set()

    def _background(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ keeping workers current
    def record_bridge_state(self, worker: Worker, changes: Any) -> None:
        """A reply from ``worker`` carried ``bridge_state``: record it for the whole pool (the
        worker has applied it already); idle workers apply it now, busy ones before their next
        call, new ones before their first."""
        version = self.bridge_state.record(changes)
        if version:
            worker.state_version = version
            self.service_idle()

    def needs_update(self, worker: Worker) -> bool:
        return bool(worker.pending_deletes) or worker.state_version < self.bridge_state.version

    async def bring_up_to_date(self, worker: Worker) -> None:
        """Before a call: drop copies of deleted resources, apply bridge-wide state it lacks."""
        timeout = self.cfg.options.timeout
        while worker.pending_deletes:
            rid = worker.pending_deletes.pop()
            await worker.channel.request(
                "delete_resource", {"resource_id": rid, "missing_ok": True}, timeout=timeout
            )
        await self.apply_bridge_state(worker)

    async def apply_bridge_state(self, worker: Worker) -> None:
        state = self.bridge_state
        due = state.due(worker.state_version)
        if due is None:
            return
        version = state.version
        await worker.channel.request(
            "apply_bridge_state",
            {"state": due},
            timeout=self.cfg.options.timeout,
            cancel_grace=self.cfg.options.cancel_grace,
        )
        worker.state_version = max(worker.state_version, version)

    async def _update_then_hand_out(self, worker: Worker) -> None:
        try:
            await self.bring_up_to_date(worker)
        except MLBridgeError as exc:
            self.log.warning("worker %s could not be brought up to date: %s", worker.id, exc)
            worker.channel.kill(f"it could not be brought up to date ({exc})")
        if worker.alive:
            self._hand_out(worker)
        else:
            worker.busy = False

    def _take_stale_idle(self) -> list[Worker]:
        with self.lock:
            stale = [w for w in self.idle if w.alive and self.needs_update(w)]
            for w in stale:
                self.idle.remove(w)
                w.busy = True
        return stale

    def service_idle(self) -> None:
        """Idle workers that lack something (a delete, new state) get it now, in the
        background; busy ones get it before their next call."""
        for w in self._take_stale_idle():
            self._background(self._update_then_hand_out(w))

    async def service_idle_now(self) -> None:
        await asyncio.gather(*(self._update_then_hand_out(w) for w in self._take_stale_idle()))

    # ------------------------------------------------------------------ caller-thread fast path
    def call_direct(self, command: str, args: dict[str, Any], timeout: float | None) -> Any:
        """Caller thread (``MLBridge``): run a call on an idle, up-to-date worker of a ready
        pool without a hop through the loop; :data:`NOT_DIRECT` when there is none (the caller
        then submits the call to the loop). The thread writes the request itself and may read
        its reply itself for a moment (:meth:`WorkerChannel.poll_reply`); the loop, which reads
        every worker's output anyway, settles it otherwise."""
        if self.state != "ready":
            return NOT_DIRECT
        with self.lock:
            worker = None
            while self.idle:
                w = self.idle.popleft()
                if w.alive:
                    worker = w
                    break
            if worker is None:
                return NOT_DIRECT
            if self.needs_update(worker):
                self.idle.appendleft(worker)
                return NOT_DIRECT
            worker.busy = True
        from .direct import run_direct

        return run_direct(self, worker, command, args, timeout)

    def direct_release(self, worker: Worker, ok: bool) -> None:
        """Caller thread: the end of a direct call. The worker goes straight back to the idle
        list when nothing else is due; otherwise the loop decides (``_after_call``)."""
        with self.lock:
            self._count(worker, ok)
            if (
                not self.waiters
                and worker.alive
                and not worker.channel.abandoned
                and self.state == "ready"
                and not self.needs_update(worker)
                and policy.recycle_reason(worker.facts(time.monotonic()), self.cfg.options) is None
            ):
                worker.busy = False
                self.idle.append(worker)
                return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._after_call, worker)

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

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

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
            if policy.missing_core(self._counts()) > 0 and self.state in ("ready", "starting"):
                delay = policy.restart_delay(self.crash_streak, self.boot_failures, backoff)
                if delay:
                    await asyncio.sleep(delay)
                    backoff = min(backoff * 2, opts.max_restart_backoff)
                else:
                    backoff = opts.restart_backoff
                if self.state in ("closed", "broken"):
                    break
                # Counted again after the pause: a checkout may have started one meanwhile.
                missing = policy.missing_core(self._counts())
                if missing > 0:
                    await asyncio.gather(*(self._spawn_worker() for _ in range(missing)))
                continue
            now = time.monotonic()
            if opts.health_check_interval > 0 and now - last_health >= opts.health_check_interval:
                last_health = now
                await self._health_round()
            self._retire_idle(time.monotonic())

    async def health_check(self) -> None:
        """One heartbeat round now (the supervisor runs one every health_check_interval)."""
        await self._health_round()

    async def _health_round(self) -> None:
        opts = self.cfg.options
        workers = [w for w in self.workers if w.alive]
        results = await asyncio.gather(
            *(self._heartbeat(w, opts.heartbeat_timeout) for w in workers),
            return_exceptions=True,
        )
        for w, res in zip(workers, results, strict=True):
            if isinstance(res, BaseException):
                if w.alive:
                    running = w.channel.running_commands()
                    during = (
                        f" while running {', '.join(repr(c) for c in running)}; calls that hold "
                        "the GIL (or block the worker's control thread) that long need a larger "
                        "heartbeat_timeout"
                        if running
                        else ""
                    )
                    why = f"it missed its heartbeat ({opts.heartbeat_timeout:g} s){during}"
                    self.log.warning("worker %s of %r: %s; killing it", w.id, self.name, why)
                    w.channel.kill(why)
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
        self._retire_idle(time.monotonic())

    @staticmethod
    async def _heartbeat(w: Worker, timeout: float) -> dict[str, Any]:
        """One heartbeat; TimeoutError when unanswered (the health round decides the rest:
        no cancel, since the worker's control thread did not even answer)."""
        rid, pending = w.channel.start_request("heartbeat", {})
        try:
            reply = await asyncio.wait_for(asyncio.shield(pending.future), timeout)
        finally:
            w.channel.pending.pop(rid, None)
        result: dict[str, Any] = WorkerChannel.result(reply)
        return result

    def _retire_idle(self, now: float) -> None:
        """Recycle idle workers the policy says are due, retire idle overflow workers."""
        with self.lock:
            idle = list(self.idle)
        for w in idle:
            facts = w.facts(now)
            reason = policy.recycle_reason(facts, self.cfg.options)
            if reason is not None:
                self._retire(w, reason, event="recycled")
                continue
            reason = policy.retire_idle_overflow(facts, self.cfg.options)
            if reason is not None:
                self._retire(w, reason, event="retired")

    # ------------------------------------------------------------------ introspection
    def statistics(self) -> PoolStatistics:
        now = time.monotonic()
        workers = []
        for w in self.workers:
            rss = _rss(w.pid) or w.rss_bytes
            workers.append(
                WorkerStatistics(
                    id=w.id,
                    pid=w.pid,
                    busy=w.busy,
                    overflow=w.overflow,
                    requests=w.requests,
                    errors=w.errors,
                    rss_bytes=rss,
                    uptime=now - w.ready_at,
                    resources=len(w.resources),
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


def _rss(pid: int | None) -> int:
    """Resident memory of a local worker process, now (0 when unknown or not local)."""
    if pid is None:
        return 0
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return 0
