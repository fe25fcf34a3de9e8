"""The host: one pool per bridge, host-owned resources, sessions, bridge-wide state, call-backs.

Theory of operation
-------------------
A :class:`Host` lives on one asyncio event loop, and everything it owns is touched only from
that loop: the registry of bridge configs, one :class:`~.pool.Pool` per started bridge, the
:class:`~.resources.ResourceStore`, the :class:`~.sessions.SessionStore`, the per-bridge
:class:`~.bridge_state.BridgeState` and the telemetry. ``AsyncMLBridge`` calls it directly;
``MLBridge`` runs the loop in a thread and submits to it (plus the pool's one documented
caller-thread fast path, :meth:`Pool.call_direct`).

Every call takes the same path, :class:`_Call`: check a worker out of the pool (the session's
worker preferred), bring it up to date (queued resource deletes, bridge-wide state it has not
applied), run the work, then hand the worker back, move the session's affinity and report the
request. A call that never reached a worker (it died first) waits for a live one and runs
within its timeout. Call-backs from workers (``{"cb": ...}`` frames) become tasks running an
ordinary host call on the target bridge; the pool's checkout refuses, with a clear error, a
call-back that could only deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from .._protocol.messages import MessageError
from .._protocol.wire_errors import failure_from_exception
from ..config import BridgeConfig, MLBridgeConfig
from ..errors import (
    BridgeUnavailableError,
    ConfigError,
    InvalidRequestError,
    MLBridgeError,
    ResourceNotFoundError,
    WorkerCrashedError,
)
from . import calls
from .bridge_state import BridgeState
from .channel import WorkerChannel
from .connection import Connection
from .pool import Pool, Worker
from .reaper import PidRegistry
from .registry import EnvironmentProblem, Registry, check_environment, validate_environment
from .resources import HostResource, ResourceStore
from .sessions import SessionState, SessionStore
from .stats import HostStatistics
from .telemetry import Event, RequestEvent, Telemetry, prometheus_text

__all__ = ["Host", "HostResource", "SessionState"]

log = logging.getLogger("mlbridge.host")
T = TypeVar("T")


class _Call:
    """One call's hold on a worker: checkout + bring up to date, then release + report."""

    __slots__ = ("code", "command", "host", "ok", "pool", "session", "session_id", "t0", "worker")

    def __init__(self, host: Host, pool: Pool, command: str, session_id: str | None) -> None:
        self.host = host
        self.pool = pool
        self.command = command
        self.session_id = session_id
        self.session = host.sessions.for_call(session_id, pool.name)
        self.ok = False
        self.code: str | None = None
        self.t0 = 0.0
        self.worker: Worker

    async def enter(self, prefer: str | None, caller: Worker | None) -> Worker:
        session = self.session
        if session is not None and session.worker_id is not None:
            prefer = session.worker_id
        self.t0 = time.perf_counter()
        worker = self.worker = await self.pool.checkout(prefer=prefer, caller=caller)
        try:
            await self.pool.bring_up_to_date(worker)
        except BaseException as exc:
            self.exit(exc)
            raise
        return worker

    def exit(self, exc: BaseException | None) -> None:
        """Return the worker (see Pool.release for a call given up on), move the session's
        affinity, mark it used, and report the request."""
        if exc is None:
            self.ok = True
        elif isinstance(exc, MLBridgeError):
            self.code = exc.code
        worker = self.worker
        self.pool.release(worker, ok=self.ok)
        if self.session is not None:
            self.session.used(worker.id if worker.alive else None)
        self.host.telemetry.emit(
            RequestEvent(
                self.pool.name,
                self.command,
                time.perf_counter() - self.t0,
                self.ok,
                worker.id,
                self.code,
                self.session_id,
            )
        )


class Host:
    def __init__(self, config: MLBridgeConfig | None = None) -> None:
        config = config or MLBridgeConfig()
        self.registry = Registry(config)
        self.pools: dict[str, Pool] = {}
        self.resources = ResourceStore()
        self.sessions = SessionStore()
        self.bridge_states: dict[str, BridgeState] = {}
        self.telemetry = Telemetry()
        self.pids = PidRegistry()
        self.started_at = time.time()
        self.closed = False
        self._sweeper: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.pids.reap()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_sessions())
        eager = [name for name, cfg in self.configs.items() if not cfg.options.lazy]
        for name in eager:  # a broken environment is reported before any worker starts
            await self.preflight(self.config_for(name))
        await asyncio.gather(*(self.pool(name).ensure_started() for name in eager))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)
        self.pools.clear()
        self.pids.close()

    def add_hook(self, hook: Any) -> Any:
        return self.telemetry.add_hook(hook)

    # ------------------------------------------------------------------ bridges
    @property
    def configs(self) -> Mapping[str, BridgeConfig]:
        return self.registry.config.bridges

    @property
    def default_bridge(self) -> str | None:
        return self.registry.default

    def list_frameworks(self) -> list[str]:
        return sorted(self.configs)

    def config_for(self, name: str) -> BridgeConfig:
        return self.registry.get(name)

    async def validate_environment(self, name: str) -> list[EnvironmentProblem]:
        """Everything that would stop ``name``'s workers from starting (empty when fine)."""
        return await asyncio.to_thread(validate_environment, self.config_for(name))

    async def preflight(self, cfg: BridgeConfig) -> None:
        """Check interpreter, module, packages and env vars before spawning (cached per
        interpreter); raises EnvironmentCheckError listing every problem and its fix."""
        await asyncio.to_thread(check_environment, cfg)

    def resolve_name(self, framework: str | None) -> str:
        if framework:
            return framework
        if self.default_bridge:
            return self.default_bridge
        raise ConfigError("no framework given and no default_bridge configured")

    def pool(self, name: str) -> Pool:
        p = self.pools.get(name)
        if p is not None:
            return p
        if self.closed:
            raise BridgeUnavailableError("the host is closed")
        cfg = self.config_for(name)
        p = self.pools[name] = Pool(
            cfg,
            bridge_state=self.bridge_states.setdefault(name, BridgeState()),
            preflight=self.preflight,
            on_callback=self._on_callback,
            emit=self.telemetry.emit,
            register_pid=self.pids.register,
            unregister_pid=self.pids.unregister,
            emit_threadsafe=self.telemetry.emit_threadsafe,
            worker_env=self.pids.worker_env(),
        )
        return p

    async def register(
        self,
        cfg: BridgeConfig,
        *,
        start: bool = True,
        replace_existing: bool = True,
        keep_state: bool = False,
    ) -> None:
        """Register (or replace) a bridge. With ``start``, its environment is checked first
        (interpreter, module, packages, env vars): a bridge that cannot run is not registered,
        and the one it would have replaced stays as it was. A replaced bridge's bridge-wide
        state is dropped unless ``keep_state`` (a config update of the same bridge)."""
        if start:
            await self.preflight(cfg)
        cfg = self.registry.register(cfg, replace_existing=replace_existing)
        if not keep_state:
            self.bridge_states.pop(cfg.name, None)
        old = self.pools.pop(cfg.name, None)
        if old is not None:
            await old.close()
            self.sessions.forget_workers(cfg.name)
        if start:
            await self.pool(cfg.name).ensure_started()

    async def update_config(self, name: str, **changes: Any) -> BridgeConfig:
        """Replace a bridge's config (its pool restarts with it; host-owned resources and
        bridge-wide state survive)."""
        new = self.config_for(name).replace(**changes)
        was_started = name in self.pools and self.pools[name].state not in ("idle",)
        await self.register(new, start=was_started, keep_state=True)
        return new

    # ------------------------------------------------------------------ the call path
    async def _retry_undelivered(
        self, timeout: float | None, attempt: Callable[[float | None], Awaitable[T]]
    ) -> T:
        """Run ``attempt(timeout_left)``; while it fails because its worker died before the
        request reached it (nothing ran), run it again on a live worker, within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        left = timeout
        while True:
            try:
                return await attempt(left)
            except WorkerCrashedError as exc:
                if not exc.details.get("undelivered"):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                log.info("running the call again on another worker: %s", exc.message)
                left = None if deadline is None else max(0.001, deadline - time.monotonic())

    async def execute(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        caller: Worker | None = None,
    ) -> Any:
        pool = self.pools.get(framework) or self.pool(framework)
        opts = pool.cfg.options
        args = args if args is not None else {}

        async def attempt(left: float | None) -> Any:
            call = _Call(self, pool, command, session_id)
            worker = await call.enter(None, caller)
            try:
                reply = await calls.call(
                    worker.channel,
                    command,
                    args,
                    timeout=left,
                    session_id=session_id,
                    cancel_grace=opts.cancel_grace,
                )
                result = WorkerChannel.result(reply)
                if "bridge_state" in reply:
                    pool.record_bridge_state(worker, reply["bridge_state"])
            except BaseException as exc:
                call.exit(exc)
                raise
            call.exit(None)
            return result

        return await self._retry_undelivered(opts.timeout if timeout is None else timeout, attempt)

    async def stream(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        caller: Worker | None = None,
        final: list[Any] | None = None,
    ) -> AsyncIterator[Any]:
        """Yield a streaming command's chunks; its final result is appended to ``final``."""
        pool = self.pool(framework)
        opts = pool.cfg.options
        call = _Call(self, pool, command, session_id)
        worker = await call.enter(None, caller)
        error: BaseException | None = None
        try:
            replies: list[dict[str, Any]] = []
            async for chunk in calls.stream(
                worker.channel,
                command,
                args if args is not None else {},
                timeout=opts.timeout if timeout is None else timeout,
                session_id=session_id,
                cancel_grace=opts.cancel_grace,
                replies=replies,
            ):
                yield chunk
            if final is not None and replies:
                final.append(replies[0].get("result"))
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.exit(error)

    # ------------------------------------------------------------------ resources
    async def create_resource(
        self,
        framework: str,
        rtype: str,
        config: dict[str, Any],
        *,
        session_id: str | None = None,
        resource_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        self.config_for(framework)
        rec = self.resources.new(
            framework, rtype, config, session_id=session_id, resource_id=resource_id
        )
        pool = self.pool(framework)

        async def attempt(left: float | None) -> None:
            call = _Call(self, pool, f"create_{rtype}", session_id)
            worker = await call.enter(None, None)
            try:
                await self._build(worker, rec, left)
            except BaseException as exc:
                call.exit(exc)
                raise
            call.exit(None)

        opts = pool.cfg.options
        await self._retry_undelivered(opts.timeout if timeout is None else timeout, attempt)
        self.resources.add(rec)
        session = self.sessions.for_call(session_id, framework)
        if session is not None:
            session.resources.add(rec.id)
        return rec.id

    async def _build(self, worker: Worker, rec: HostResource, timeout: float | None) -> None:
        opts = self.configs[rec.framework].options
        await worker.channel.request(
            f"create_{rec.type}",
            rec.build_args(),
            timeout=opts.timeout if timeout is None else timeout,
            cancel_grace=opts.cancel_grace,
        )
        worker.resources[rec.id] = rec.version
        worker.pending_deletes.discard(rec.id)

    async def _ensure_built(self, worker: Worker, rec: HostResource, timeout: float | None) -> None:
        if worker.resources.get(rec.id) != rec.version:
            await self._build(worker, rec, timeout)

    async def execute_resource(
        self,
        framework: str,
        rid: str,
        inputs: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        command: str = "execute_resource",
        extra_args: dict[str, Any] | None = None,
    ) -> Any:
        rec = self.resources.get(framework, rid)
        pool = self.pool(framework)
        opts = pool.cfg.options
        session_id = session_id or rec.session_id
        args: dict[str, Any] = {"resource_id": rid, "inputs": inputs or {}}
        if extra_args:
            args.update(extra_args)

        async def attempt(left: float | None) -> Any:
            call = _Call(self, pool, command, session_id)
            worker = await call.enter(rec.last_worker, None)
            try:
                for first in (True, False):
                    await self._ensure_built(worker, rec, left)
                    reply = await calls.call(
                        worker.channel,
                        command,
                        args,
                        timeout=left,
                        session_id=session_id,
                        cancel_grace=opts.cancel_grace,
                    )
                    if first and reply.get("error_code") == "resource_not_found":
                        worker.resources.pop(rid, None)  # our bookkeeping was stale: rebuild
                        continue
                    break
                self.resources.save_states(worker, reply.get("resource_states"))
                result = WorkerChannel.result(reply)
                if "bridge_state" in reply:
                    pool.record_bridge_state(worker, reply["bridge_state"])
                rec.executed_on(worker.id)
            except BaseException as exc:
                call.exit(exc)
                raise
            call.exit(None)
            return result

        return await self._retry_undelivered(opts.timeout if timeout is None else timeout, attempt)

    async def stream_resource(
        self,
        framework: str,
        rid: str,
        inputs: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        final: list[Any] | None = None,
    ) -> AsyncIterator[Any]:
        """``execute_resource`` as a stream: the resource type's chunks, then its final output."""
        rec = self.resources.get(framework, rid)
        pool = self.pool(framework)
        opts = pool.cfg.options
        session_id = session_id or rec.session_id
        call = _Call(self, pool, "execute_resource", session_id)
        worker = await call.enter(rec.last_worker, None)
        error: BaseException | None = None
        try:
            await self._ensure_built(worker, rec, timeout)
            replies: list[dict[str, Any]] = []
            async for chunk in calls.stream(
                worker.channel,
                "execute_resource",
                {"resource_id": rid, "inputs": inputs or {}},
                timeout=opts.timeout if timeout is None else timeout,
                session_id=session_id,
                cancel_grace=opts.cancel_grace,
                replies=replies,
            ):
                yield chunk
            if replies:
                self.resources.save_states(worker, replies[0].get("resource_states"))
                if final is not None:
                    final.append(replies[0].get("result"))
            rec.executed_on(worker.id)
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.exit(error)

    def list_resources(
        self,
        framework: str | None = None,
        rtype: str | None = None,
        *,
        session_id: str | None = None,
    ) -> list[dict[str, Any]]:
        return self.resources.listing(framework, rtype, session_id)

    async def delete_resource(self, framework: str, rid: str) -> dict[str, Any]:
        pool = self.pools.get(framework)
        rec, copies = self.resources.remove(framework, rid, pool.workers if pool else ())
        self.sessions.forget_resource(rid)
        if pool is not None:
            await pool.service_idle_now()  # idle workers drop their copy now, busy ones later
        return {"resource_id": rec.id, "status": "deleted", "copies": copies}

    # ------------------------------------------------------------------ sessions
    def open_session(
        self, framework: str, *, ttl: float | None = None, session_id: str | None = None
    ) -> SessionState:
        self.config_for(framework)
        return self.sessions.open(framework, ttl, session_id)

    async def close_session(self, session_id: str) -> int:
        s = self.sessions.pop(session_id)
        if s is None:
            return 0
        removed = 0
        for rid in list(s.resources):
            with contextlib.suppress(ResourceNotFoundError):
                await self.delete_resource(s.framework, rid)
                removed += 1
        return removed

    async def _sweep_sessions(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.telemetry.drain()
            for s in self.sessions.expired():
                log.info("session %s expired after %gs idle", s.id, s.ttl)
                try:
                    await self.close_session(s.id)
                except MLBridgeError as exc:
                    log.warning("closing expired session %s failed: %s", s.id, exc)

    # ------------------------------------------------------------------ call-backs
    def _worker_of(self, channel: WorkerChannel) -> Worker | None:
        pool = self.pools.get(channel.bridge)
        return pool.worker_of(channel) if pool is not None else None

    async def _on_callback(self, channel: WorkerChannel, msg: dict[str, Any]) -> None:
        try:
            req = Connection.parse_callback(msg)
        except MessageError as exc:
            channel.send_callback_reply(
                failure_from_exception(
                    exc.id, InvalidRequestError(str(exc)), with_traceback=False
                ).to_wire("cb")
            )
            return
        caller = self._worker_of(channel)
        if caller is not None:
            caller.waiting_on_callbacks += 1
        try:
            if req.stream:
                final: list[Any] = []
                async for chunk in self.stream(
                    req.bridge,
                    req.command,
                    req.args,
                    session_id=req.session_id,
                    timeout=req.timeout,
                    caller=caller,
                    final=final,
                ):
                    channel.send_callback_reply({"cb": req.cb, "chunk": chunk})
                result = final[0] if final else None
            else:
                result = await self.execute(
                    req.bridge,
                    req.command,
                    req.args,
                    session_id=req.session_id,
                    timeout=req.timeout,
                    caller=caller,
                )
            channel.send_callback_reply({"cb": req.cb, "success": True, "result": result})
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            channel.send_callback_reply(failure_from_exception(req.cb, exc).to_wire("cb"))
        finally:
            if caller is not None:
                caller.waiting_on_callbacks -= 1

    # ------------------------------------------------------------------ introspection
    def statistics(self) -> HostStatistics:
        self.telemetry.drain()
        pools = {}
        for name, cfg in sorted(self.configs.items()):
            p = self.pools.get(name)
            pools[name] = p.statistics() if p is not None else Pool.idle_statistics(cfg)
        return HostStatistics(
            uptime=time.time() - self.started_at,
            default_bridge=self.default_bridge,
            pools=pools,
            resources=len(self.resources),
            sessions=len(self.sessions),
        )

    async def health_check(self, names: list[str] | None = None) -> HostStatistics:
        """Heartbeat every worker of the started pools in ``names`` now (RSS, liveness; a worker
        that does not answer is killed and replaced), then return :meth:`statistics`."""
        pools = [p for n, p in self.pools.items() if names is None or n in names]
        await asyncio.gather(*(p.health_check() for p in pools), return_exceptions=True)
        return self.statistics()

    def prometheus(self) -> str:
        return prometheus_text(self.telemetry, self.statistics().to_dict())

    def emit(self, event: Event) -> None:
        self.telemetry.emit(event)
