"""Starting, replacing and checking a pool's workers: the supervisor side of :class:`Pool`.

One supervisor task per pool (:meth:`PoolSupervisor._supervise`) is the only code that starts
replacement workers (with backoff after crashes), sends heartbeats, recycles idle workers the
policy says are due, and retires idle overflow workers. Spawning waits for a worker's ``hello``
and gives it the bridge-wide state before it takes a call; consecutive boot failures make the
pool *broken* (:func:`.policy.boot_verdict`). An exit is accounted here: dropped from the pool,
reported, counted as a restart when it was not asked for. Runs on the host's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from .._backends import WorkerSpec, get_backend
from .._backends.isolation import request_of
from .._config_perf import with_model_ttl
from .._envs import bridge_python
from .._protocol.exit_codes import BOOT_FAILURE_CODES
from ..errors import MLBridgeError
from . import policy
from .channel import WorkerChannel
from .placement import backend_options
from .pool_core import PoolCore, Worker
from .registry import worker_environment
from .telemetry import HealthEvent, WorkerEvent

__all__ = ["PoolSupervisor", "rss_of"]


class PoolSupervisor(PoolCore):
    def _spec(self, worker_id: str) -> WorkerSpec:
        cfg, opts = self.cfg, self.cfg.options
        return WorkerSpec(
            bridge=self.name,
            worker_id=worker_id,
            target=cfg.target,
            python=bridge_python(cfg),
            env={**worker_environment(cfg), **self._worker_env},
            settings=with_model_ttl(cfg.settings, opts.model_ttl),
            limits=opts.limits,
            threads=opts.threads,
            codec=opts.codec,
            max_frame_bytes=opts.max_frame_bytes,
            parent_pid=os.getpid(),
            backend_options=backend_options(cfg),
            isolation=request_of(opts, cfg.target, list(cfg.env)),
        )

    def _backend_name(self) -> str:
        """The backend option, but ``start = "fork"`` forks local workers from a template."""
        opts = self.cfg.options
        return "fork" if opts.start == "fork" and opts.backend == "local" else opts.backend

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
            get_backend(self._backend_name()),
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
                local = opts.backend in ("local", "fork")
                await channel.handshake(
                    opts.codec,
                    opts.startup_timeout,
                    shm_threshold=opts.shm_threshold_bytes if local else 0,
                    shm_pool_bytes=opts.shm_pool_bytes,
                )
                self.result_cache.learn(channel.hello)
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
        worker.rss_bytes = rss_of(channel.pid)
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
        definitive = self.definitive_boot_failure = returncode in BOOT_FAILURE_CODES
        broken = policy.boot_verdict(
            self.boot_failures, self.cfg.options.max_boot_failures, definitive
        )
        self.log.error(
            "worker %s of %r failed to boot (%d/%d%s): %s",
            wid,
            self.name,
            self.boot_failures,
            self.cfg.options.max_boot_failures,
            "; a boot error that will not fix itself: the bridge is broken"
            if broken and definitive
            else "; the bridge is broken"
            if broken
            else "",
            why,
        )
        if broken:
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


def rss_of(pid: int | None) -> int:
    """Resident memory of a local worker process, now (0 when unknown or not local)."""
    if pid is None:
        return 0
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:
        return 0
