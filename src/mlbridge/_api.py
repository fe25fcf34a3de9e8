"""The public API: :class:`AsyncMLBridge` (asyncio) and :class:`MLBridge` (blocking).

Theory of operation
-------------------
``AsyncMLBridge`` wraps a :class:`~mlbridge._host.host.Host` on the caller's running loop; the
host starts on first use (or ``async with``). ``MLBridge`` owns a private event loop in a daemon
thread named ``mlbridge-host``: every method submits a coroutine to that loop and blocks on its
result, so it is safe to call from any number of threads. Worker processes are children of that
thread (Linux's parent-death signal is tied to it), which lives until ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from ._host.channel import MANY_CPUS, WorkerChannel
from ._host.host import Host, SessionState
from ._host.pending import SyncPending
from ._host.pool import Pool, Worker
from ._host.telemetry import RequestEvent
from .config import BridgeConfig, MLBridgeConfig, bridge_config
from .errors import BridgeUnavailableError, ConfigError, MLBridgeError, WorkerCrashedError

__all__ = ["AsyncMLBridge", "AsyncSession", "MLBridge", "Session"]

T = TypeVar("T")
ConfigLike = MLBridgeConfig | Mapping[str, Any] | str | os.PathLike[str] | None


def _load_config(config: ConfigLike, env_overrides: bool) -> MLBridgeConfig:
    if config is None:
        # mlbridge.toml / pyproject / $MLBRIDGE_CONFIG, else the built-in bridges; then MLBRIDGE_*
        return MLBridgeConfig.load(environ=None if env_overrides else {})
    if isinstance(config, MLBridgeConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = MLBridgeConfig.from_mapping(config)
    elif isinstance(config, str | os.PathLike):
        cfg = MLBridgeConfig.from_toml(Path(config))
    else:
        raise ConfigError(
            f"cannot build a config from {type(config).__name__}: pass an MLBridgeConfig, a "
            "mapping, or the path of an mlbridge.toml"
        )
    return MLBridgeConfig.from_env(base=cfg) if env_overrides else cfg


class AsyncMLBridge:
    """Run ML frameworks in supervised worker pools, from asyncio code."""

    def __init__(self, config: ConfigLike = None, *, env_overrides: bool = True) -> None:
        cfg = _load_config(config, env_overrides)
        self.config = cfg
        self._host = Host(cfg)
        self._started = False
        self._start_lock: asyncio.Lock | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> AsyncMLBridge:
        return cls(MLBridgeConfig.from_toml(Path(path)))

    @property
    def host(self) -> Host:
        return self._host

    async def start(self) -> AsyncMLBridge:
        if not self._started:
            if self._start_lock is None:
                self._start_lock = asyncio.Lock()
            async with self._start_lock:
                if not self._started:
                    if self._host.closed:
                        raise BridgeUnavailableError("this bridge was closed; create a new one")
                    await self._host.start()
                    self._started = True
        return self

    async def __aenter__(self) -> AsyncMLBridge:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._host.close()

    aclose = close

    # -- calls ---------------------------------------------------------------------------
    async def execute(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``command`` on a worker of ``framework`` and return its result."""
        if not self._started:
            await self.start()
        return await self._host.execute(
            framework, command, args, session_id=session_id, timeout=timeout
        )

    async def stream(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Yield the chunks of a streaming command (the worker sends them as they come)."""
        if not self._started:
            await self.start()
        async for chunk in self._host.stream(
            framework, command, args, session_id=session_id, timeout=timeout
        ):
            yield chunk

    async def create_resource(
        self,
        framework: str,
        type: str,
        config: dict[str, Any],
        *,
        session_id: str | None = None,
        resource_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Create a host-owned resource; returns its id. Any worker can rebuild it later."""
        if not self._started:
            await self.start()
        return await self._host.create_resource(
            framework, type, config, session_id=session_id, resource_id=resource_id, timeout=timeout
        )

    async def execute_resource(
        self,
        framework: str,
        resource_id: str,
        inputs: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        if not self._started:
            await self.start()
        return await self._host.execute_resource(
            framework, resource_id, inputs, session_id=session_id, timeout=timeout
        )

    async def list_resources(
        self, framework: str | None = None, type: str | None = None
    ) -> list[dict[str, Any]]:
        return self._host.list_resources(framework, type)

    async def delete_resource(self, framework: str, resource_id: str) -> dict[str, Any]:
        if not self._started:
            await self.start()
        return await self._host.delete_resource(framework, resource_id)

    async def get_stats(self, framework: str) -> dict[str, Any]:
        self._host.config_for(framework)
        return dict(self._host.statistics()["pools"][framework])

    def list_frameworks(self) -> list[str]:
        return self._host.list_frameworks()

    async def get_framework_info(self, framework: str) -> dict[str, Any]:
        info = await self.execute(framework, "get_info")
        return dict(info)

    def session(
        self, framework: str, *, ttl: float | None = None, session_id: str | None = None
    ) -> AsyncSession:
        return AsyncSession(
            self, self._host.open_session(framework, ttl=ttl, session_id=session_id)
        )

    async def start_bridge(
        self,
        name: str,
        *,
        python_script: str | None = None,
        python_module: str | None = None,
        pool_size: int = 1,
        overflow: int = 0,
        start: bool = True,
        **options: Any,
    ) -> BridgeConfig:
        """Register a bridge at run time and (by default) start its pool."""
        if not self._started:
            await self.start()
        cfg = bridge_config(
            name,
            python_script=python_script,
            python_module=python_module,
            pool_size=pool_size,
            overflow=overflow,
            **options,
        )
        await self._host.register(cfg, start=start)
        return cfg

    async def validate_environment(self, name: str) -> list[Any]:
        """Problems (interpreter, module, packages, env vars) that would stop ``name``'s workers;
        each has ``kind``, ``message`` and ``fix``. Empty when the bridge can run."""
        return list(await self._host.validate_environment(name))

    async def update_config(self, name: str, **changes: Any) -> BridgeConfig:
        """Change a bridge's config; its pool restarts, host-owned resources survive."""
        if not self._started:
            await self.start()
        return await self._host.update_config(name, **changes)

    def statistics(self) -> dict[str, Any]:
        """A snapshot of the host, its pools and their workers."""
        return self._host.statistics()

    def add_hook(self, hook: Callable[[Any], Any]) -> Callable[[], None]:
        """Call ``hook(event)`` for every telemetry event; returns a remover."""
        remove: Callable[[], None] = self._host.add_hook(hook)
        return remove

    def prometheus(self) -> str:
        return self._host.prometheus()


class AsyncSession:
    """Resources and calls grouped on one preferred worker; closing deletes its resources."""

    def __init__(self, bridge: AsyncMLBridge, state: SessionState) -> None:
        self._bridge = bridge
        self._state = state
        self.id = state.id
        self.framework = state.framework

    async def execute(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        return await self._bridge.execute(
            self.framework, command, args, session_id=self.id, timeout=timeout
        )

    def stream(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        return self._bridge.stream(
            self.framework, command, args, session_id=self.id, timeout=timeout
        )

    async def create_resource(
        self, type: str, config: dict[str, Any], *, resource_id: str | None = None
    ) -> str:
        return await self._bridge.create_resource(
            self.framework, type, config, session_id=self.id, resource_id=resource_id
        )

    async def execute_resource(
        self,
        resource_id: str,
        inputs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        return await self._bridge.execute_resource(
            self.framework, resource_id, inputs, session_id=self.id, timeout=timeout
        )

    async def list_resources(self) -> list[dict[str, Any]]:
        return self._bridge.host.list_resources(self.framework, session_id=self.id)

    @property
    def worker_id(self) -> str | None:
        return self._state.worker_id

    async def close(self) -> int:
        return await self._bridge.host.close_session(self.id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


DIRECT_SPIN_S = 200e-6  # a direct call polls for its reply this long before sleeping


class _Waiter:
    """One blocking call's rendezvous between the caller thread and the loop thread."""

    __slots__ = ("error", "lock", "result", "task")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.result: Any = None
        self.error: BaseException | None = None
        self.task: asyncio.Task[Any] | None = None

    def start(self, loop: asyncio.AbstractEventLoop, coro: Any) -> None:
        self.task = loop.create_task(coro)
        self.task.add_done_callback(self.done)

    def done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            self.error = BridgeUnavailableError("the call was cancelled (the bridge is closing)")
        else:
            self.error = task.exception()
            if self.error is None:
                self.result = task.result()
        self.lock.release()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


class MLBridge:
    """The blocking API: the same methods as :class:`AsyncMLBridge`, callable from any thread."""

    def __init__(self, config: ConfigLike = None, *, env_overrides: bool = True) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="mlbridge-host", daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False
        try:
            self._async = self._call(self._make(config, env_overrides))
            self._call(self._async.start())
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _make(config: ConfigLike, env_overrides: bool) -> AsyncMLBridge:
        return AsyncMLBridge(config, env_overrides=env_overrides)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> MLBridge:
        return cls(MLBridgeConfig.from_toml(Path(path)))

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    def _call(self, coro: Awaitable[T]) -> T:
        if self._closed and not self._loop.is_running():
            if asyncio.iscoroutine(coro):
                coro.close()
            raise BridgeUnavailableError("this MLBridge is closed; create a new one")
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "MLBridge (sync) was called from its own loop thread (e.g. inside a telemetry "
                "hook); use AsyncMLBridge there"
            )
        # A lighter hand-off than run_coroutine_threadsafe (no concurrent Future, no Condition):
        # the loop thread creates the task; its done-callback releases a lock we block on.
        waiter = _Waiter()
        self._loop.call_soon_threadsafe(waiter.start, self._loop, coro)
        try:
            waiter.lock.acquire()
        except BaseException:  # e.g. KeyboardInterrupt: stop the call in the host as well
            self._loop.call_soon_threadsafe(waiter.cancel)
            raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[no-any-return]

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    @property
    def host(self) -> Host:
        return self._async.host

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._async.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> MLBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    # -- calls ---------------------------------------------------------------------------
    def execute(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        host = self._async._host
        if session_id is None and not self._closed:
            pool = host.pools.get(framework)
            worker = pool.take_idle_threadsafe() if pool is not None else None
            if worker is not None:
                assert pool is not None
                try:
                    return self._execute_direct(pool, worker, command, args or {}, timeout)
                except WorkerCrashedError as exc:
                    if not exc.details.get("undelivered"):
                        raise
                    # never reached the (already dead) worker: run it on another one

        return self._call(
            host.execute(framework, command, args, session_id=session_id, timeout=timeout)
        )

    def _execute_direct(
        self, pool: Pool, worker: Worker, command: str, args: dict[str, Any], timeout: float | None
    ) -> Any:
        """The direct path: an idle worker of a ready pool, used from this thread.

        This thread writes the request; the loop thread, which reads every worker's output
        anyway, hands the reply over through a lock. No task and no second thread hop, so a
        blocking call costs about what an asyncio call does. Everything else (a pool that is not
        started, sessions, waiting for a worker, recycling) goes through the loop.
        """
        opts = pool.cfg.options
        channel = worker.channel
        limit = opts.timeout if timeout is None else timeout
        t0 = time.perf_counter()
        ok = False
        code: str | None = None
        try:
            rid, pending = channel.start_sync_request(command, args)
            if MANY_CPUS:
                channel.poll_reply(rid, pending, min(DIRECT_SPIN_S, limit))
            if not pending.lock.acquire(timeout=limit):
                self._direct_timeout(channel, rid, pending, command, limit, opts.cancel_grace)
            if pending.error is not None:
                raise pending.error
            assert pending.reply is not None
            result = channel._result(pending.reply, command)
            ok = True
            return result
        except MLBridgeError as exc:
            code = exc.code
            raise
        finally:
            if not pool.release_threadsafe(worker, ok):
                self._loop.call_soon_threadsafe(functools.partial(pool.release, worker, ok=ok))
            self._async._host.telemetry.emit_threadsafe(
                RequestEvent(pool.name, command, time.perf_counter() - t0, ok, worker.id, code)
            )

    def _direct_timeout(
        self,
        channel: WorkerChannel,
        rid: int,
        pending: SyncPending,
        command: str,
        timeout: float,
        grace: float,
    ) -> NoReturn:
        with contextlib.suppress(MLBridgeError):
            channel._send_cancel(rid)
        if not pending.lock.acquire(timeout=grace):
            channel.pending.pop(rid, None)
            channel.doomed = True  # never handed out again, even before the kill lands
            reason = f"it did not stop {command!r} within {grace:g}s of a cancel"
            self._loop.call_soon_threadsafe(channel.kill, reason)
        raise channel.timeout_error(command, timeout)

    def stream(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        agen = self._async.stream(framework, command, args, session_id=session_id, timeout=timeout)
        assert isinstance(agen, AsyncGenerator)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed and self._loop.is_running():
                self._call(agen.aclose())

    def create_resource(
        self,
        framework: str,
        type: str,
        config: dict[str, Any],
        *,
        session_id: str | None = None,
        resource_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        return self._call(
            self._async.create_resource(
                framework,
                type,
                config,
                session_id=session_id,
                resource_id=resource_id,
                timeout=timeout,
            )
        )

    def execute_resource(
        self,
        framework: str,
        resource_id: str,
        inputs: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        return self._call(
            self._async.execute_resource(
                framework, resource_id, inputs, session_id=session_id, timeout=timeout
            )
        )

    def list_resources(
        self, framework: str | None = None, type: str | None = None
    ) -> list[dict[str, Any]]:
        return self._call(self._async.list_resources(framework, type))

    def delete_resource(self, framework: str, resource_id: str) -> dict[str, Any]:
        return self._call(self._async.delete_resource(framework, resource_id))

    def get_stats(self, framework: str) -> dict[str, Any]:
        return self._call(self._async.get_stats(framework))

    def list_frameworks(self) -> list[str]:
        return self._async.list_frameworks()

    def get_framework_info(self, framework: str) -> dict[str, Any]:
        return self._call(self._async.get_framework_info(framework))

    def session(
        self, framework: str, *, ttl: float | None = None, session_id: str | None = None
    ) -> Session:
        async def _open() -> AsyncSession:
            return self._async.session(framework, ttl=ttl, session_id=session_id)

        return Session(self, self._call(_open()))

    def start_bridge(
        self,
        name: str,
        *,
        python_script: str | None = None,
        python_module: str | None = None,
        pool_size: int = 1,
        overflow: int = 0,
        start: bool = True,
        **options: Any,
    ) -> BridgeConfig:
        return self._call(
            self._async.start_bridge(
                name,
                python_script=python_script,
                python_module=python_module,
                pool_size=pool_size,
                overflow=overflow,
                start=start,
                **options,
            )
        )

    def validate_environment(self, name: str) -> list[Any]:
        return self._call(self._async.validate_environment(name))

    def update_config(self, name: str, **changes: Any) -> BridgeConfig:
        return self._call(self._async.update_config(name, **changes))

    def statistics(self) -> dict[str, Any]:
        async def _snap() -> dict[str, Any]:
            return self._async.statistics()

        return self._call(_snap())

    def add_hook(self, hook: Callable[[Any], Any]) -> Callable[[], None]:
        return self._async.add_hook(hook)

    def prometheus(self) -> str:
        async def _text() -> str:
            return self._async.prometheus()

        return self._call(_text())


class Session:
    """Blocking twin of :class:`AsyncSession`."""

    def __init__(self, bridge: MLBridge, inner: AsyncSession) -> None:
        self._bridge = bridge
        self._inner = inner
        self.id = inner.id
        self.framework = inner.framework

    def execute(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        return self._bridge.execute(
            self.framework, command, args, session_id=self.id, timeout=timeout
        )

    def stream(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Iterator[Any]:
        return self._bridge.stream(
            self.framework, command, args, session_id=self.id, timeout=timeout
        )

    def create_resource(
        self, type: str, config: dict[str, Any], *, resource_id: str | None = None
    ) -> str:
        return self._bridge.create_resource(
            self.framework, type, config, session_id=self.id, resource_id=resource_id
        )

    def execute_resource(
        self,
        resource_id: str,
        inputs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        return self._bridge.execute_resource(
            self.framework, resource_id, inputs, session_id=self.id, timeout=timeout
        )

    def list_resources(self) -> list[dict[str, Any]]:
        return self._bridge._call(self._inner.list_resources())

    @property
    def worker_id(self) -> str | None:
        return self._inner.worker_id

    def close(self) -> int:
        return self._bridge._call(self._inner.close())

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
