"""The host: one pool per bridge, host-owned resources, sessions, bridge-wide state, call-backs.

Theory of operation
-------------------
A :class:`Host` lives on one asyncio event loop, and everything it owns is touched only from
that loop: the registry of bridge configs, one :class:`~.pool.Pool` per started bridge, the
:class:`~.resources.ResourceStore`, the :class:`~.sessions.SessionStore`, the per-bridge
:class:`~.bridge_state.BridgeState` and the telemetry. ``AsyncMLBridge`` calls it directly;
``MLBridge`` runs the loop in a thread and submits to it (plus the pool's one documented
caller-thread fast path, :meth:`Pool.call_direct`).

Every call takes the same path, :class:`~.callpath.Call`: check a worker out of the pool (the
session's worker preferred), bring it up to date (queued resource deletes, bridge-wide state it
has not applied), run the work, then hand the worker back, move the session's affinity and
report the request. A call that never reached a worker (it died first) waits for a live one and
runs within its timeout. The resource calls live in :mod:`.resource_calls`; call-backs from
workers (``{"cb": ...}`` frames) are routed by :mod:`.callbacks` as ordinary host calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

from ..config import BridgeConfig, MLBridgeConfig
from ..errors import (
    BridgeUnavailableError,
    ConfigError,
    MLBridgeError,
    ResourceNotFoundError,
    WorkerCrashedError,
)
from . import calls, shm_host
from .bridge_state import BridgeState
from .callbacks import route_callback
from .callpath import retry_undelivered
from .channel import WorkerChannel
from .env_progress import prepare_environment
from .placement import configure_backend
from .pool import Pool, Worker
from .prometheus import prometheus_text
from .reaper import PidRegistry
from .registry import EnvironmentProblem, Registry, check_environment, validate_environment
from .resource_calls import ResourceCalls
from .resources import HostResource, ResourceStore
from .sessions import SessionState, SessionStore
from .stats import HostStatistics
from .telemetry import Event, Telemetry

__all__ = ["Host", "HostResource", "SessionState"]

log = logging.getLogger("mlbridge.host")
T = TypeVar("T")


class Host(ResourceCalls):
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
        shm_host.sweep_leftovers()  # shared-memory payloads of hosts that died
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep_sessions())
        drain = self.telemetry.drain

        def wake() -> None:
            loop.call_soon_threadsafe(drain)

        self.telemetry.wake = wake
        eager = [name for name, cfg in self.configs.items() if not cfg.options.lazy]
        for name in eager:  # a broken environment is reported before any worker starts
            await self.preflight(self.config_for(name))
        await asyncio.gather(*(self.pool(name).ensure_started() for name in eager))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.telemetry.wake = None
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
        if cfg.environment is not None:  # build (or find cached) the bridge's own environment
            await prepare_environment(cfg, self.telemetry.emit)
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
        configure_backend(cfg, self.registry.config)
        p = self.pools[name] = Pool(
            cfg,
            bridge_state=self.bridge_states.setdefault(name, BridgeState()),
            preflight=self.preflight,
            on_callback=self._on_callback,
            emit=self.telemetry.emit,
            register_pid=self.pids.register,
            unregister_pid=self.pids.unregister,
            record_threadsafe=self.telemetry.request_threadsafe,
            record=self.telemetry.request,
            worker_env=self.pids.worker_env(),
            save_states=self.resources.save_states,
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

    async def execute(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        caller: Worker | None = None,
        cache: bool = True,
    ) -> Any:
        pool = self.pools.get(framework) or self.pool(framework)
        opts = pool.cfg.options
        args = args if args is not None else {}
        key = None
        if cache and pool.result_cache.enabled:  # (cache=False: neither read nor written)
            if pool.state != "ready":
                await pool.ensure_started()  # its workers' hello says what is cacheable
            key = pool.result_cache.key(command, args, pool.bridge_state.version)
            if key is not None:
                hit, value = pool.result_cache.get(key)
                if hit:
                    return value

        async def attempt(left: float | None) -> Any:
            async with self._call(pool, command, session_id, caller=caller) as w:
                for first in (True, False):
                    reply = await calls.call(
                        w.channel,
                        command,
                        args,
                        timeout=left,
                        session_id=session_id,
                        cancel_grace=opts.cancel_grace,
                    )
                    # A command naming a host-owned resource (e.g. DSPy's optimize) on a worker
                    # without its copy: build the copy there and run the command once more.
                    if (
                        first
                        and reply.get("error_code") == "resource_not_found"
                        and await self._built_missing(w, reply, left)
                    ):
                        continue
                    break
                result = pool.result_of(w, reply)
                if key is not None:
                    pool.result_cache.keep(key, reply, result)
                return result

        limit = opts.timeout if timeout is None else timeout
        try:
            return await attempt(limit)
        except WorkerCrashedError as exc:
            if not exc.details.get("undelivered"):
                raise
        return await retry_undelivered(limit, attempt)  # it never reached a worker: run it

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
        async with self._call(pool, command, session_id, caller=caller) as worker:
            limit = opts.timeout if timeout is None else timeout
            async for chunk in self._stream_on(
                pool, worker, command, args if args is not None else {}, limit, session_id, final
            ):
                yield chunk

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
    async def _on_callback(self, channel: WorkerChannel, msg: dict[str, Any]) -> None:
        await route_callback(self, channel, msg)

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
