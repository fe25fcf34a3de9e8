"""A pool's state and the rules that hand workers out and take them back (see :mod:`.pool`).

:class:`PoolCore` holds everything a pool owns — the :class:`Worker` list, the idle deque, the
waiters, the counters, the bridge-wide state — and the release path every call ends on: count the
call, then hand the worker to the next waiter or back to the idle list, recycle it, or wait for a
call its caller abandoned. :mod:`.supervisor` (starting, replacing and checking workers),
:mod:`.direct` (the blocking API's fast path) and :mod:`.pool` (checkout, statistics, close) build
on it. Owned by the host's event loop; ``lock`` guards ``idle``, ``waiters`` and the counters for
the one caller-thread path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import BridgeConfig
from ..errors import BridgeBrokenError, MLBridgeError
from . import policy
from .bridge_state import BridgeState
from .channel import CallbackHandler, WorkerChannel
from .result_cache import ResultCache
from .telemetry import DirectRecorder, Emitter, RequestRecorder, WorkerEvent

__all__ = ["NOT_DIRECT", "PoolCore", "Worker"]

NOT_DIRECT: Any = object()  # call_direct could not take the fast path: submit to the loop


_monotonic = time.monotonic


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


class PoolCore:
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
        record_threadsafe: DirectRecorder | None = None,
        record: RequestRecorder | None = None,
        worker_env: dict[str, str] | None = None,
        save_states: Callable[[Worker, Any], None] = lambda worker, states: None,
    ) -> None:
        self.cfg = cfg
        opts = cfg.options
        self._recycles = bool(opts.max_requests or opts.max_age or opts.max_memory)
        self._save_states = save_states  # the host's resource records
        self._worker_env = dict(worker_env or {})  # the host's reaper token: set last, so it wins
        self.name = cfg.name
        self.log = logging.getLogger(f"mlbridge.pool.{cfg.name}")
        self.bridge_state = bridge_state if bridge_state is not None else BridgeState()
        self._on_callback = on_callback
        self._preflight = preflight
        self._emit = emit
        # a direct call's end, from its caller's thread (Telemetry.request_threadsafe)
        self.record_threadsafe = record_threadsafe or (lambda *fields: None)
        # a loop-thread direct call's end (Telemetry.request)
        self.record = record or (lambda *fields: None)
        self._register_pid = register_pid
        self._unregister_pid = unregister_pid
        self.state = "idle"  # idle -> starting -> ready | broken; closed
        self.workers: list[Worker] = []
        self.idle: deque[Worker] = deque()
        self.lock = threading.Lock()  # see the module docstring: idle, waiters, counters
        self.waiters: deque[asyncio.Future[Worker]] = deque()
        self.starting = 0  # workers being started right now
        self.boot_failures = 0
        self.definitive_boot_failure = False  # the last boot failure had a named boot exit code
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
        self.result_cache = ResultCache.for_options(opts)  # cacheable commands' results

    def _broken_error(self) -> BridgeBrokenError:
        limit = self.cfg.options.max_boot_failures
        why = (
            f"{self.boot_failures} of max_boot_failures={limit} boots in a row"
            if not self.definitive_boot_failure
            else f"{self.boot_failures} boots in a row, with an error that will not fix itself "
            f"(so before max_boot_failures={limit})"
        )
        return BridgeBrokenError(
            f"bridge {self.name!r} is broken: its workers failed {why}. Last boot error: "
            f"{self.boot_error}. Fix: correct what that boot error names (`mlbridge doctor` "
            "imports the bridge in its own interpreter and prints an import error's traceback; "
            "an error raised while the framework initialises is the one quoted here), then "
            "restart it: "
            f"from Python with start_bridge({self.name!r}, ...) or update_config({self.name!r}, "
            f"...); from the CLI, `mlbridge restart {self.name}` for a running host (`mlbridge "
            "serve`), or run the command again (each `mlbridge call` or `mlbridge status` without "
            "a running host starts its pools afresh).",
            bridge=self.name,
        )

    def _fail_waiters(self, err: MLBridgeError) -> None:
        with self.lock:
            waiters, self.waiters = self.waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(err)

    def worker_of(self, channel: WorkerChannel) -> Worker | None:
        return next((w for w in self.workers if w.channel is channel), None)

    def _counts(self) -> policy.PoolCounts:
        core = sum(1 for w in self.workers if not w.overflow)
        return policy.PoolCounts(
            len(self.workers), core, self.starting, self.cfg.pool_size, self.cfg.overflow
        )

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

    def release(self, worker: Worker, *, ok: bool = True, caller_thread: bool = False) -> None:
        """A call on ``worker`` ended (on the loop thread, or on the caller's thread of a direct
        call): count it. The worker goes straight back to the idle list when nothing else is
        due; otherwise the policy of :meth:`_after_call` decides, on the loop (soon, when this
        runs on a caller thread). See the module docstring for a call given up on."""
        channel = worker.channel
        with self.lock:
            worker.last_used = _monotonic()
            worker.requests += 1
            self.total_requests += 1
            if not ok:
                worker.errors += 1
                self.total_errors += 1
            elif not worker.overflow:
                self.crash_streak = 0
            if (
                not self.waiters
                and channel.alive
                and not channel.abandoned
                and self.state == "ready"
                and not worker.pending_deletes  # needs_update(), inlined
                and worker.state_version >= self.bridge_state.version
                and (not self._recycles or self.recycle_reason(worker) is None)
            ):
                worker.busy = False
                self.idle.append(worker)
                return
        if not caller_thread:
            self._after_call(worker)
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._after_call, worker)

    def _after_call(self, worker: Worker) -> None:
        channel = worker.channel
        if not channel.alive:
            worker.busy = False
            return
        if channel.abandoned:
            self._background(self._release_when_quiet(worker))
            return
        reason = self.recycle_reason(worker) if self._recycles else None
        if reason is not None:
            worker.busy = False
            self._retire(worker, reason, event="recycled")
            return
        if worker.pending_deletes or worker.state_version < self.bridge_state.version:
            # needs_update(worker), inlined (every call ends here)
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

    def recycle_reason(self, worker: Worker) -> str | None:
        """:func:`.policy.recycle_reason` for ``worker`` now (None at once when the bridge
        recycles on nothing: the common case costs no facts object per call)."""
        if not self._recycles:
            return None
        return policy.recycle_reason(worker.facts(time.monotonic()), self.cfg.options)

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

    def result_of(self, worker: Worker, reply: dict[str, Any]) -> Any:
        """A final reply's result (its typed error for a failure), after keeping what it
        carries: resource states (saved in the host's records) and bridge-wide state (for
        the whole pool). Loop thread."""
        if "resource_states" in reply or "bridge_state" in reply:
            self.absorb(worker, reply)
        if reply.get("success"):
            return reply.get("result")
        return WorkerChannel.result(reply)

    def absorb(self, worker: Worker, reply: dict[str, Any]) -> None:
        if "resource_states" in reply:
            self._save_states(worker, reply["resource_states"])
        if "bridge_state" in reply:
            self.record_bridge_state(worker, reply["bridge_state"])

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

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop
