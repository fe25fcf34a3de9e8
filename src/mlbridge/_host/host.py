"""The host: pools per bridge, host-owned resources, sessions, call-back routing, telemetry.

Theory of operation
-------------------
A :class:`Host` lives on one asyncio event loop and everything it owns is touched only from that
loop: the bridge configs, one :class:`Pool` per started bridge, the resource records, the
sessions and the telemetry. ``AsyncMLBridge`` calls it directly; ``MLBridge`` (sync) runs the loop
in a background thread and submits coroutines to it.

Resources are owned here. ``create_resource`` records ``(framework, type, config)`` under an id
before any worker sees it; a worker's live object is a cache, tagged with the record's
*version*. Executing a resource on a worker whose copy is missing or stale first rebuilds it from
the record (config + last saved state); a reply carrying ``resource_states`` bumps the version.
So calls can go to any worker, a crashed or recycled worker loses nothing, and deleting a
resource deletes every copy (idle workers at once, busy ones before their next call).

Call-backs: a worker's ``{"cb": ...}`` frame becomes a task that runs an ordinary host call on
the target bridge (with the caller's session) and writes the reply back keyed ``"cb"``. The
pool's checkout refuses, with a clear error, a call that could only deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._protocol.messages import CallbackRequest, MessageError
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
from .channel import WorkerChannel
from .pool import Pool, Worker
from .reaper import PidRegistry
from .registry import EnvironmentProblem, Registry, check_environment, validate_environment
from .telemetry import Event, RequestEvent, Telemetry, prometheus_text

__all__ = ["Host", "HostResource", "SessionState"]

log = logging.getLogger("mlbridge.host")


@dataclass(slots=True)
class HostResource:
    id: str
    framework: str
    type: str
    config: dict[str, Any]
    session_id: str | None = None
    state: Any = None
    version: int = 1
    created_at: float = field(default_factory=time.time)
    execution_count: int = 0
    last_executed: float | None = None
    last_worker: str | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "resource_id": self.id,
            "framework": self.framework,
            "type": self.type,
            "config": self.config,
            "session_id": self.session_id,
            "has_state": self.state is not None,
            "version": self.version,
            "created_at": self.created_at,
            "execution_count": self.execution_count,
            "last_executed": self.last_executed,
        }


@dataclass(slots=True)
class SessionState:
    id: str
    framework: str
    ttl: float | None = None
    worker_id: str | None = None
    resources: set[str] = field(default_factory=set)
    created_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)


class Host:
    def __init__(self, config: MLBridgeConfig | None = None) -> None:
        config = config or MLBridgeConfig()
        self.registry = Registry(config)
        self.pools: dict[str, Pool] = {}
        self.resources: dict[str, HostResource] = {}
        self.sessions: dict[str, SessionState] = {}
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
        if self.closed:
            raise BridgeUnavailableError("the host is closed")
        p = self.pools.get(name)
        if p is None:
            cfg = self.config_for(name)
            p = self.pools[name] = Pool(
                cfg,
                preflight=self.preflight,
                on_callback=self._on_callback,
                emit=self.telemetry.emit,
                register_pid=self.pids.register,
                unregister_pid=self.pids.unregister,
            )
        return p

    async def register(
        self, cfg: BridgeConfig, *, start: bool = True, replace_existing: bool = True
    ) -> None:
        """Register (or replace) a bridge. With ``start``, its environment is checked first
        (interpreter, module, packages, env vars): a bridge that cannot run is not registered,
        and the one it would have replaced stays as it was."""
        if start:
            await self.preflight(cfg)
        cfg = self.registry.register(cfg, replace_existing=replace_existing)
        old = self.pools.pop(cfg.name, None)
        if old is not None:
            await old.close()
            self._forget_worker_copies(cfg.name)
        if start:
            await self.pool(cfg.name).ensure_started()

    async def update_config(self, name: str, **changes: Any) -> BridgeConfig:
        """Replace a bridge's config (its pool restarts with it; host-owned resources survive)."""
        new = self.config_for(name).replace(**changes)
        was_started = name in self.pools and self.pools[name].state not in ("idle",)
        await self.register(new, start=was_started)
        return new

    def _forget_worker_copies(self, framework: str) -> None:
        for s in self.sessions.values():
            if s.framework == framework:
                s.worker_id = None

    # ------------------------------------------------------------------ calls
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
        try:
            return await self._execute_once(framework, command, args, session_id, timeout, caller)
        except WorkerCrashedError as exc:
            if not exc.details.get("undelivered"):
                raise
            # The worker died before our request reached it (killed while idle, its exit not
            # yet noticed): nothing ran, so one retry on another worker is safe.
            log.info("retrying %s:%s on another worker: %s", framework, command, exc.message)
            return await self._execute_once(framework, command, args, session_id, timeout, caller)

    async def _execute_once(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None,
        session_id: str | None,
        timeout: float | None,
        caller: Worker | None,
    ) -> Any:
        pool = self.pools.get(framework) or self.pool(framework)
        opts = pool.cfg.options
        session = self.sessions.get(session_id) if session_id else None
        t0 = time.perf_counter()
        worker = await pool.checkout(prefer=session.worker_id if session else None, caller=caller)
        ok = False
        code = None
        try:
            if worker.pending_deletes:
                await self._flush_deletes(worker, opts.timeout)
            result = await worker.channel.request(
                command,
                args if args is not None else {},
                timeout=opts.timeout if timeout is None else timeout,
                session_id=session_id,
                cancel_grace=opts.cancel_grace,
            )
            ok = True
            return result
        except MLBridgeError as exc:
            code = exc.code
            raise
        finally:
            self._finish_call(pool, worker, session, command, t0, ok, code, session_id)

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
        pool = self.pool(framework)
        opts = pool.cfg.options
        session = self.sessions.get(session_id) if session_id else None
        t0 = time.perf_counter()
        worker = await pool.checkout(prefer=session.worker_id if session else None, caller=caller)
        ok = False
        code = None
        try:
            if worker.pending_deletes:
                await self._flush_deletes(worker, opts.timeout)
            async for chunk in worker.channel.stream(
                command,
                args if args is not None else {},
                timeout=opts.timeout if timeout is None else timeout,
                session_id=session_id,
                cancel_grace=opts.cancel_grace,
                final=final,
            ):
                yield chunk
            ok = True
        except MLBridgeError as exc:
            code = exc.code
            raise
        finally:
            self._finish_call(pool, worker, session, command, t0, ok, code, session_id)

    def _finish_call(
        self,
        pool: Pool,
        worker: Worker,
        session: SessionState | None,
        command: str,
        t0: float,
        ok: bool,
        code: str | None,
        session_id: str | None,
    ) -> None:
        """After any call on a checked-out worker: return it, move the session's affinity to
        it (or off it, if it died) and mark the session used, and report the request."""
        pool.release(worker, ok=ok)
        if session is not None:
            session.worker_id = worker.id if worker.alive else None
            session.last_used = time.monotonic()
        self.telemetry.emit(
            RequestEvent(
                pool.name, command, time.perf_counter() - t0, ok, worker.id, code, session_id
            )
        )

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
        if not isinstance(config, dict):
            raise InvalidRequestError(
                f"resource config must be a dict, got {type(config).__name__}"
            )
        self.config_for(framework)
        rid = resource_id or f"{rtype}_{uuid.uuid4().hex[:12]}"
        if rid in self.resources:
            raise InvalidRequestError(f"a resource with id {rid!r} already exists; delete it first")
        rec = HostResource(rid, framework, rtype, dict(config), session_id)
        pool = self.pool(framework)
        session = self.sessions.get(session_id) if session_id else None
        worker = await pool.checkout(prefer=session.worker_id if session else None)
        ok = False
        try:
            await self._build(worker, rec, timeout)
            ok = True
        finally:
            pool.release(worker, ok=ok)
        self.resources[rid] = rec
        if session is not None:
            session.resources.add(rid)
            session.worker_id = worker.id
        return rid

    async def _build(self, worker: Worker, rec: HostResource, timeout: float | None) -> None:
        opts = self.configs[rec.framework].options
        args: dict[str, Any] = {
            "resource_id": rec.id,
            "config": rec.config,
            "session_id": rec.session_id,
        }
        if rec.state is not None:
            args["state"] = rec.state
        await worker.channel.request(
            f"create_{rec.type}",
            args,
            timeout=opts.timeout if timeout is None else timeout,
            cancel_grace=opts.cancel_grace,
        )
        worker.resources[rec.id] = rec.version
        worker.pending_deletes.discard(rec.id)

    def _get_record(self, framework: str, rid: str) -> HostResource:
        rec = self.resources.get(rid)
        if rec is None or rec.framework != framework:
            raise ResourceNotFoundError(
                f"no {framework!r} resource with id {rid!r}; create it with create_resource first",
                resource_id=rid,
            )
        return rec

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
        rec = self._get_record(framework, rid)
        pool = self.pool(framework)
        opts = pool.cfg.options
        session_id = session_id or rec.session_id
        session = self.sessions.get(session_id) if session_id else None
        prefer = session.worker_id if session and session.worker_id else rec.last_worker
        t0 = time.perf_counter()
        worker = await pool.checkout(prefer=prefer)
        ok = False
        code = None
        try:
            if worker.pending_deletes:
                await self._flush_deletes(worker, opts.timeout)
            args: dict[str, Any] = {"resource_id": rid, "inputs": inputs or {}}
            if extra_args:
                args.update(extra_args)
            for attempt in (1, 2):
                if worker.resources.get(rid) != rec.version:
                    await self._build(worker, rec, timeout)
                rid_req, pending = worker.channel.start_request(
                    command, args, session_id=session_id
                )
                reply = await worker.channel._await_reply(
                    rid_req,
                    pending,
                    command,
                    opts.timeout if timeout is None else timeout,
                    opts.cancel_grace,
                )
                if (
                    not reply.get("success")
                    and reply.get("error_code") == "resource_not_found"
                    and attempt == 1
                ):
                    worker.resources.pop(rid, None)  # our bookkeeping was stale: rebuild once
                    continue
                break
            self._apply_states(worker, reply.get("resource_states"))
            result = worker.channel._result(reply, command)
            rec.execution_count += 1
            rec.last_executed = time.time()
            rec.last_worker = worker.id
            ok = True
            return result
        except MLBridgeError as exc:
            code = exc.code
            raise
        finally:
            self._finish_call(pool, worker, session, command, t0, ok, code, session_id)

    def _apply_states(self, worker: Worker, states: Any) -> None:
        if not isinstance(states, dict):
            return
        for rid, state in states.items():
            rec = self.resources.get(rid)
            if rec is not None:
                rec.state = state
                rec.version += 1
                worker.resources[rid] = rec.version

    def list_resources(
        self,
        framework: str | None = None,
        rtype: str | None = None,
        *,
        session_id: str | None = None,
    ) -> list[dict[str, Any]]:
        return [
            r.snapshot()
            for r in self.resources.values()
            if (framework is None or r.framework == framework)
            and (rtype is None or r.type == rtype)
            and (session_id is None or r.session_id == session_id)
        ]

    async def delete_resource(self, framework: str, rid: str) -> dict[str, Any]:
        rec = self._get_record(framework, rid)
        del self.resources[rid]
        for s in self.sessions.values():
            s.resources.discard(rid)
        pool = self.pools.get(framework)
        copies = 0
        if pool is not None:
            for w in list(pool.workers):
                if rid in w.resources:
                    w.resources.pop(rid, None)
                    w.pending_deletes.add(rid)
                    copies += 1
            # Idle workers drop their copy now; busy ones before their next call.
            with pool.lock:
                flush = [w for w in pool.idle if w.pending_deletes and w.alive]
                for w in flush:
                    pool.idle.remove(w)
                    w.busy = True
            for w in flush:
                try:
                    await self._flush_deletes(w, pool.cfg.options.timeout)
                finally:
                    pool.release(w)
        return {"resource_id": rec.id, "status": "deleted", "copies": copies}

    async def _flush_deletes(self, worker: Worker, timeout: float) -> None:
        while worker.pending_deletes:
            rid = worker.pending_deletes.pop()
            await worker.channel.request(
                "delete_resource", {"resource_id": rid, "missing_ok": True}, timeout=timeout
            )

    # ------------------------------------------------------------------ sessions
    def open_session(
        self, framework: str, *, ttl: float | None = None, session_id: str | None = None
    ) -> SessionState:
        self.config_for(framework)
        sid = session_id or f"session_{uuid.uuid4().hex[:12]}"
        if sid in self.sessions:
            raise InvalidRequestError(f"session {sid!r} already exists")
        s = self.sessions[sid] = SessionState(sid, framework, ttl)
        return s

    async def close_session(self, session_id: str) -> int:
        s = self.sessions.pop(session_id, None)
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
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if s.ttl is not None and now - s.last_used > s.ttl:
                    log.info("session %s expired after %gs idle", s.id, s.ttl)
                    try:
                        await self.close_session(s.id)
                    except MLBridgeError as exc:
                        log.warning("closing expired session %s failed: %s", s.id, exc)

    # ------------------------------------------------------------------ call-backs
    def _worker_of(self, channel: WorkerChannel) -> Worker | None:
        pool = self.pools.get(channel.bridge)
        if pool is None:
            return None
        return next((w for w in pool.workers if w.channel is channel), None)

    async def _on_callback(self, channel: WorkerChannel, msg: dict[str, Any]) -> None:
        try:
            req = CallbackRequest.from_wire(msg)
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
    def statistics(self) -> dict[str, Any]:
        self.telemetry.drain()
        now = time.monotonic()
        pools: dict[str, Any] = {}
        for name, cfg in sorted(self.configs.items()):
            p = self.pools.get(name)
            workers = []
            if p is not None:
                for w in p.workers:
                    workers.append(
                        {
                            "id": w.id,
                            "pid": w.pid,
                            "busy": w.busy,
                            "overflow": w.overflow,
                            "requests": w.requests,
                            "errors": w.errors,
                            "rss_bytes": w.rss_bytes,
                            "uptime": now - w.ready_at,
                            "resources": len(w.resources),
                        }
                    )
            pools[name] = {
                "name": name,
                "state": p.state if p is not None else "idle",
                "pool_size": cfg.pool_size,
                "overflow": cfg.overflow,
                "workers": workers,
                "idle_workers": len(p.idle) if p else 0,
                "waiting_callers": len(p.waiters) if p else 0,
                "requests": p.total_requests if p else 0,
                "errors": p.total_errors if p else 0,
                "restarts": p.restarts if p else 0,
                "boot_error": p.boot_error if p else None,
                "uptime": (time.time() - p.started_at) if p and p.started_at else 0.0,
            }
        return {
            "uptime": time.time() - self.started_at,
            "default_bridge": self.default_bridge,
            "pools": pools,
            "resources": len(self.resources),
            "sessions": len(self.sessions),
        }

    async def health_check(self, names: list[str] | None = None) -> dict[str, Any]:
        """Heartbeat every worker of the started pools in ``names`` now (RSS, liveness; a worker
        that does not answer is killed and replaced), then return :meth:`statistics`."""
        pools = [p for n, p in self.pools.items() if names is None or n in names]
        await asyncio.gather(*(p.health_check() for p in pools), return_exceptions=True)
        return self.statistics()

    def prometheus(self) -> str:
        return prometheus_text(self.telemetry, self.statistics())

    def emit(self, event: Event) -> None:
        self.telemetry.emit(event)
