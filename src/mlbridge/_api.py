"""The public API: :class:`AsyncMLBridge` (asyncio), and :class:`MLBridge` derived from it.

Theory of operation
-------------------
The API is written once, in :class:`AsyncMLBridge` and :class:`AsyncSession`, over a
:class:`~mlbridge._host.host.Host` on the caller's running loop (the host starts on first use or
``async with``); arguments are validated here, at the boundary. :class:`MLBridge` and
:class:`Session` are derived from them: each blocking method is a :class:`_blocking` descriptor
wrapping the async method of the same name, which runs it on a private event loop in a daemon
thread named ``mlbridge-host`` and blocks for its result — so it is safe to call from any number
of threads and takes exactly the host path of the async API. The one addition is the pool's
documented caller-thread fast path for ``execute`` (:meth:`Pool.call_direct`). Worker processes
are children of the loop thread (Linux's parent-death signal is tied to it), which lives until
``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from ._host.host import Host, SessionState
from ._host.pool import NOT_DIRECT
from ._host.reaper import install_exit_handlers
from ._host.stats import HostStatistics, PoolStatistics
from ._streams import AsyncStream, Stream
from .config import BridgeConfig, MLBridgeConfig, bridge_config
from .errors import BridgeUnavailableError, ConfigError, InvalidArgumentError

__all__ = ["AsyncMLBridge", "AsyncSession", "MLBridge", "Session"]

T = TypeVar("T")
_Coroutine = types.CoroutineType  # what Pool.call_now returns when the reply is not in yet
P = ParamSpec("P")
R = TypeVar("R")
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


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """``None`` (the bridge's default) or a positive, finite number of seconds."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidArgumentError(
            f"{name} must be a number of seconds (or None for the bridge's default), got "
            f"{type(timeout).__name__} {timeout!r}; pass e.g. {name}=5.0"
        )
    if not math.isfinite(timeout) or timeout <= 0:
        raise InvalidArgumentError(
            f"{name} must be a positive number of seconds, got {timeout!r}; pass None for the "
            "bridge's default timeout, or e.g. 5.0"
        )
    return float(timeout)


def check_cache_flag(cache: object) -> None:
    if not isinstance(cache, bool):
        raise InvalidArgumentError(
            f"cache must be True or False, got {type(cache).__name__} {cache!r}; pass "
            "cache=False to bypass the bridge's result cache for this call"
        )


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
        """Stop every worker (calls still in flight fail, saying the host is closing)."""
        await self._host.close()

    aclose = close

    async def _host_started(self) -> Host:
        if not self._started:
            await self.start()
        return self._host

    # -- calls ---------------------------------------------------------------------------
    async def execute(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        cache: bool = True,
    ) -> Any:
        """Run ``command`` on a worker of ``framework`` and return its result.

        ``cache=False``: neither answer from nor store into the bridge's result cache
        (``cache_ttl``), e.g. to see a fresh result of a cacheable command."""
        if timeout is not None:
            timeout = check_timeout(timeout)
        if cache is not True and cache is not False:
            check_cache_flag(cache)
        if not self._started:
            await self.start()
        if session_id is None:
            pool = self._host.pools.get(framework)
            if pool is not None:  # the fast path (Pool.call_now), else the host's call path
                result = pool.call_now(command, args if args is not None else {}, timeout, cache)
                if result is not NOT_DIRECT:
                    if type(result) is not _Coroutine:
                        return result
                    result = await result
                    if result is not NOT_DIRECT:
                        return result
        return await self._host.execute(
            framework, command, args, session_id=session_id, timeout=timeout, cache=cache
        )

    def stream(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncStream:
        """The chunks of a streaming command as the worker sends them (``async for``); the
        handler's final reply is ``.result`` once the stream is exhausted."""
        timeout = check_timeout(timeout)

        async def run(final: list[Any]) -> AsyncIterator[Any]:
            host = await self._host_started()
            async for chunk in host.stream(
                framework, command, args, session_id=session_id, timeout=timeout, final=final
            ):
                yield chunk

        return AsyncStream(run)

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
        timeout = check_timeout(timeout)
        host = await self._host_started()
        return await host.create_resource(
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
        """Run a host-owned resource on any worker (rebuilt there first when needed)."""
        timeout = check_timeout(timeout)
        host = await self._host_started()
        return await host.execute_resource(
            framework, resource_id, inputs, session_id=session_id, timeout=timeout
        )

    def stream_resource(
        self,
        framework: str,
        resource_id: str,
        inputs: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncStream:
        """Stream a host-owned resource's output (e.g. a DSPy program's fields, a chain's
        tokens); the final output is ``.result`` once the stream is exhausted."""
        timeout = check_timeout(timeout)

        async def run(final: list[Any]) -> AsyncIterator[Any]:
            host = await self._host_started()
            async for chunk in host.stream_resource(
                framework, resource_id, inputs, session_id=session_id, timeout=timeout, final=final
            ):
                yield chunk

        return AsyncStream(run)

    async def list_resources(
        self, framework: str | None = None, type: str | None = None
    ) -> list[dict[str, Any]]:
        return self._host.list_resources(framework, type)

    async def delete_resource(self, framework: str, resource_id: str) -> dict[str, Any]:
        host = await self._host_started()
        return await host.delete_resource(framework, resource_id)

    async def get_stats(self, framework: str) -> dict[str, Any]:
        """The statistics of one bridge's pool, as a plain dict."""
        return self.pool_statistics(framework).to_dict()

    def pool_statistics(self, framework: str) -> PoolStatistics:
        self._host.config_for(framework)
        return self._host.statistics().pools[framework]

    def list_frameworks(self) -> list[str]:
        return self._host.list_frameworks()

    async def get_framework_info(self, framework: str) -> dict[str, Any]:
        info = await self.execute(framework, "get_info")
        return dict(info)

    def session(
        self, framework: str, *, ttl: float | None = None, session_id: str | None = None
    ) -> AsyncSession:
        """Open a session (``async with bridge.session("x") as s``): calls prefer one worker;
        closing it deletes its resources."""
        ttl = check_timeout(ttl, "ttl")
        return AsyncSession(
            self, self._host.open_session(framework, ttl=ttl, session_id=session_id)
        )

    async def start_bridge(
        self,
        /,
        name: str,
        *,
        python_script: str | None = None,
        python_module: str | None = None,
        pool_size: int | None = None,
        overflow: int | None = None,
        start: bool | str = True,
        **options: Any,
    ) -> BridgeConfig:
        """Register a bridge at run time and (by default) start its pool.

        ``pool_size`` / ``overflow`` left out: the built-in bridge's defaults (langchain 2 + 1,
        dspy 4 + 2; and langchain's 120 s timeout), else 1 / 0.

        ``start``: True/False starts the pool now or not; a string (``"fork"`` or
        ``"spawn"``) is the bridge option ``start`` (how workers start), and the pool starts."""
        if isinstance(start, str):
            options["start"], start = start, True
        host = await self._host_started()
        cfg = bridge_config(
            name,
            python_script=python_script,
            python_module=python_module,
            pool_size=pool_size,
            overflow=overflow,
            **options,
        )
        await host.register(cfg, start=start)
        return cfg

    async def validate_environment(self, name: str) -> list[Any]:
        """Problems (interpreter, module, packages, env vars) that would stop ``name``'s workers;
        each has ``kind``, ``message`` and ``fix``. Empty when the bridge can run."""
        return list(await self._host.validate_environment(name))

    async def update_config(self, /, name: str, **changes: Any) -> BridgeConfig:
        """Change a bridge's config; its pool restarts, host-owned resources and bridge-wide
        state survive."""
        host = await self._host_started()
        return await host.update_config(name, **changes)

    async def health_check(self, names: list[str] | None = None) -> HostStatistics:
        """Heartbeat every worker now (a worker that does not answer is replaced)."""
        host = await self._host_started()
        return await host.health_check(names)

    def statistics(self) -> HostStatistics:
        """A frozen snapshot of the host, its pools and their workers."""
        return self._host.statistics()

    def add_hook(self, hook: Callable[[Any], Any]) -> Callable[[], None]:
        """Call ``hook(event)`` for every telemetry event; returns a remover."""
        remove: Callable[[], None] = self._host.add_hook(hook)
        return remove

    def prometheus(self) -> str:
        """Prometheus text exposition of requests, worker events and pool gauges."""
        return self._host.prometheus()


class AsyncSession:
    """Resources and calls grouped on one preferred worker; closing deletes its resources."""

    def __init__(self, bridge: AsyncMLBridge, state: SessionState) -> None:
        self._bridge = bridge
        self._state = state
        self.id = state.id
        self.framework = state.framework

    async def execute(
        self,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        cache: bool = True,
    ) -> Any:
        return await self._bridge.execute(
            self.framework, command, args, session_id=self.id, timeout=timeout, cache=cache
        )

    def stream(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> AsyncStream:
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

    def stream_resource(
        self,
        resource_id: str,
        inputs: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncStream:
        return self._bridge.stream_resource(
            self.framework, resource_id, inputs, session_id=self.id, timeout=timeout
        )

    async def list_resources(self) -> list[dict[str, Any]]:
        return self._bridge._host.list_resources(self.framework, session_id=self.id)

    @property
    def worker_id(self) -> str | None:
        return self._state.worker_id

    @property
    def open(self) -> bool:
        """False once the session is closed, or the host closed it (its ``ttl`` expired)."""
        return self._bridge._host.sessions.sessions.get(self.id) is self._state

    async def close(self) -> int:
        return await self._bridge._host.close_session(self.id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---------------------------------------------------------------------- the blocking twin
class _Blocking(Generic[P, R]):
    """A blocking method derived from the async method of the same name: it runs on the
    owner's loop thread and blocks for the result. ``streams``: the async method returns an
    :class:`AsyncStream`, the blocking one a :class:`Stream`."""

    def __init__(self, amethod: Callable[Concatenate[Any, P], Awaitable[R]]) -> None:
        self.amethod = amethod
        self.__doc__ = amethod.__doc__
        self.name = amethod.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _Blocking[P, R]: ...

    @overload
    def __get__(self, obj: _Twin, owner: type) -> Callable[P, R]: ...

    def __get__(self, obj: _Twin | None, owner: type) -> Any:
        if obj is None:
            return self
        amethod = self.amethod
        inner = obj._inner

        def blocking(*args: P.args, **kwargs: P.kwargs) -> R:
            return obj._run(amethod(inner, *args, **kwargs))

        blocking.__name__ = self.name
        blocking.__doc__ = self.__doc__
        return blocking


class _BlockingStream(Generic[P]):
    """A blocking stream method derived from the async one (AsyncStream -> Stream)."""

    def __init__(self, amethod: Callable[Concatenate[Any, P], AsyncStream]) -> None:
        self.amethod = amethod
        self.__doc__ = amethod.__doc__

    @overload
    def __get__(self, obj: None, owner: type) -> _BlockingStream[P]: ...

    @overload
    def __get__(self, obj: _Twin, owner: type) -> Callable[P, Stream]: ...

    def __get__(self, obj: _Twin | None, owner: type) -> Any:
        if obj is None:
            return self
        amethod = self.amethod
        inner = obj._inner

        def blocking(*args: P.args, **kwargs: P.kwargs) -> Stream:
            return Stream(amethod(inner, *args, **kwargs), obj._run, obj._running)

        blocking.__doc__ = self.__doc__
        return blocking


class _OnLoop(Generic[P, R]):
    """A blocking method derived from a plain method that reads loop-owned state: it runs
    on the owner's loop thread (so it never sees the host half-way through a change)."""

    def __init__(self, method: Callable[Concatenate[Any, P], R]) -> None:
        self.method = method
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, obj: None, owner: type) -> _OnLoop[P, R]: ...

    @overload
    def __get__(self, obj: _Twin, owner: type) -> Callable[P, R]: ...

    def __get__(self, obj: _Twin | None, owner: type) -> Any:
        if obj is None:
            return self
        method = self.method
        inner = obj._inner

        async def on_loop(*args: Any, **kwargs: Any) -> R:
            return method(inner, *args, **kwargs)

        def blocking(*args: P.args, **kwargs: P.kwargs) -> R:
            return obj._run(on_loop(*args, **kwargs))

        blocking.__doc__ = self.__doc__
        return blocking


class _Twin:
    """What the descriptors need of a blocking class: the async object, and a way to run a
    coroutine on the loop thread."""

    _inner: Any

    def _run(self, coro: Awaitable[T]) -> T:
        raise NotImplementedError

    def _running(self) -> bool:
        raise NotImplementedError


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
            self.error = BridgeUnavailableError(
                "the call was stopped because the host is closing (close() was called while it "
                "was in flight, here before it reached a worker); close the bridge only after "
                "its calls have returned"
            )
        else:
            self.error = task.exception()
            if self.error is None:
                self.result = task.result()
        self.lock.release()

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


async def _cancel_leftovers() -> None:
    me = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not me]
    for t in left:
        t.cancel()
    if left:
        await asyncio.wait(left, timeout=5)


class MLBridge(_Twin):
    """The blocking API: the methods of :class:`AsyncMLBridge`, callable from any thread."""

    def __init__(self, config: ConfigLike = None, *, env_overrides: bool = True) -> None:
        install_exit_handlers()  # needs the caller's thread; the Host is built on the loop thread
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="mlbridge-host", daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False
        try:
            self._inner: AsyncMLBridge = self._run(self._make(config, env_overrides))
            self._run(self._inner.start())
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

    def _run(self, coro: Awaitable[T]) -> T:
        if self._closed and not self._loop.is_running():
            if asyncio.iscoroutine(coro):
                coro.close()
            raise BridgeUnavailableError("this MLBridge is closed; create a new one")
        if threading.current_thread() is self._thread:
            if asyncio.iscoroutine(coro):
                coro.close()
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

    _call = _run  # the name tests and older code use

    def _running(self) -> bool:
        return not self._closed and self._loop.is_running()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            # A call still waiting (e.g. on a pool that was starting when close began) must not
            # hang its caller: cancel what is left, let it settle, then stop.
            with contextlib.suppress(RuntimeError, TimeoutError):
                asyncio.run_coroutine_threadsafe(_cancel_leftovers(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    @property
    def _host(self) -> Host:
        """The private host (for tests and tools; not an API)."""
        return self._inner._host

    @property
    def config(self) -> MLBridgeConfig:
        return self._inner.config

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._inner.close())
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

    # -- derived from AsyncMLBridge ---------------------------------------------------------
    create_resource = _Blocking(AsyncMLBridge.create_resource)
    execute_resource = _Blocking(AsyncMLBridge.execute_resource)
    list_resources = _Blocking(AsyncMLBridge.list_resources)
    delete_resource = _Blocking(AsyncMLBridge.delete_resource)
    get_stats = _Blocking(AsyncMLBridge.get_stats)
    get_framework_info = _Blocking(AsyncMLBridge.get_framework_info)
    start_bridge = _Blocking(AsyncMLBridge.start_bridge)
    validate_environment = _Blocking(AsyncMLBridge.validate_environment)
    update_config = _Blocking(AsyncMLBridge.update_config)
    health_check = _Blocking(AsyncMLBridge.health_check)
    statistics = _OnLoop(AsyncMLBridge.statistics)
    prometheus = _OnLoop(AsyncMLBridge.prometheus)
    pool_statistics = _OnLoop(AsyncMLBridge.pool_statistics)
    session_state = _OnLoop(AsyncMLBridge.session)
    stream = _BlockingStream(AsyncMLBridge.stream)
    stream_resource = _BlockingStream(AsyncMLBridge.stream_resource)

    def execute(
        self,
        framework: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        session_id: str | None = None,
        timeout: float | None = None,
        cache: bool = True,
    ) -> Any:
        """Run ``command`` on a worker of ``framework`` and return its result (``cache=False``:
        bypass the bridge's result cache)."""
        if session_id is None and not self._closed:
            pool = self._inner._host.pools.get(framework)
            if pool is not None:
                if cache is not True and cache is not False:
                    check_cache_flag(cache)
                if timeout is not None:
                    timeout = check_timeout(timeout)
                result = pool.call_direct(command, args or {}, timeout, cache)
                if result is not NOT_DIRECT:
                    return result
        return self._run(
            self._inner.execute(
                framework, command, args, session_id=session_id, timeout=timeout, cache=cache
            )
        )

    def list_frameworks(self) -> list[str]:
        return self._inner.list_frameworks()

    def add_hook(self, hook: Callable[[Any], Any]) -> Callable[[], None]:
        return self._inner.add_hook(hook)

    def session(
        self, framework: str, *, ttl: float | None = None, session_id: str | None = None
    ) -> Session:
        """Open a session (a context manager): calls prefer one worker; closing it deletes
        its resources."""
        return Session(self, self.session_state(framework, ttl=ttl, session_id=session_id))


class Session(_Twin):
    """Blocking twin of :class:`AsyncSession`."""

    def __init__(self, bridge: MLBridge, inner: AsyncSession) -> None:
        self._bridge = bridge
        self._inner: AsyncSession = inner
        self.id = inner.id
        self.framework = inner.framework

    @property
    def open(self) -> bool:
        """False once the session is closed, or the host closed it (its ``ttl`` expired)."""
        return self._inner.open

    def _run(self, coro: Awaitable[T]) -> T:
        return self._bridge._run(coro)

    def _running(self) -> bool:
        return self._bridge._running()

    execute = _Blocking(AsyncSession.execute)
    create_resource = _Blocking(AsyncSession.create_resource)
    execute_resource = _Blocking(AsyncSession.execute_resource)
    list_resources = _Blocking(AsyncSession.list_resources)
    close = _Blocking(AsyncSession.close)
    stream = _BlockingStream(AsyncSession.stream)
    stream_resource = _BlockingStream(AsyncSession.stream_resource)

    @property
    def worker_id(self) -> str | None:
        return self._inner.worker_id

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
