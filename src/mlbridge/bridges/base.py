"""BaseBridge: the contract every framework bridge implements.

Theory of operation
-------------------
A bridge object lives in exactly one worker process. The worker runtime (``mlbridge._worker``)
builds it, calls :meth:`BaseBridge.setup` (which runs ``_initialize_framework`` and then
``_register_handlers``), and afterwards calls :meth:`BaseBridge.dispatch` on the **main thread**
for each request, one at a time, in arrival order. Only handlers registered with
``control=True`` (``ping``/``heartbeat``) are run as soon as they are read, by whichever thread
is reading (the control thread while a long call runs): they must be quick and must not touch
state the main thread mutates without care.

The current call is visible to a handler as :attr:`BaseBridge.call` (a :class:`CallContext`):
its id, session id, whether the caller wants a stream, and a cancel flag that the control thread
sets when a ``cancel`` arrives. Long handlers poll :meth:`BaseBridge.check_cancelled` or
``self.call.cancelled``; a handler that returns a generator is streamed chunk by chunk and the
runtime checks the flag between chunks.

Resources (programs, chains, pipelines, models...) are plugged in with
:meth:`register_resource_type`. That creates the commands ``create_<type>`` and
``list_<type>s``; ``execute_resource``, ``delete_resource``, ``list_resources`` and
``get_resource`` are common. A resource's *spec* (type + config [+ state]) is enough to rebuild it,
which is what lets the host own resources and move them between workers. A type with ``stream``
serves ``execute_resource`` sent with ``"stream": true`` as chunks, then its return value.

Two ways to declare commands, usable together (both are merged at :meth:`setup`):

* call :meth:`register_handler` inside ``_register_handlers`` (it returns ``None``); or
* return a mapping ``command -> callable`` from ``_register_handlers``, as bridges written to the
  original design do, typically including ``self.ping``, ``self.get_info``, ``self.get_stats`` and
  ``self.cleanup``. Those four are public methods a subclass may override; the command runs
  whatever the subclass defines, and ``ping`` stays a control command (answered beside a long call).

A bridge that sets no :attr:`name` takes its namespace and reported name from
``get_framework_info()["name"]``; both given and different is a boot error. ``self.stats`` is the
original live counter mapping (``requests_processed``, ``errors``, ``start_time``);
:meth:`statistics` reads the same counters. :meth:`run` serves a bridge launched as a script.

Bridge-wide state (configuration every worker of a pool must hold, e.g. DSPy's LM): a handler
calls :meth:`set_bridge_state`, which applies it here through the overridable
:meth:`apply_bridge_state` hook and reports it with the call's success reply; the host records it
and replays it to the other workers with the built-in ``apply_bridge_state`` command.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, cast

from .._worker.isolate import report as isolation_report
from ..errors import (
    CancelledCallError,
    ConfigError,
    InvalidRequestError,
    ResourceNotFoundError,
    UnknownCommandError,
)

if TYPE_CHECKING:
    from .._worker.host_client import HostClient

__all__ = ["BaseBridge", "CallContext", "Handler", "ResourceRecord", "ResourceType"]

Handler = Callable[[dict[str, Any]], Any]
RESERVED_CREATE_KEYS = frozenset({"resource_id", "config", "state", "session_id", "id"})


_EVENT_LOCK = threading.Lock()


@dataclass(slots=True)
class CallContext:
    """The request being handled on the main thread.

    Cancellation is a plain flag (set by the control thread with :meth:`cancel`, read with
    :attr:`cancelled`); a :class:`threading.Event` to wait on is made only when a handler asks
    for :attr:`cancel_event`, so the common call that is never cancelled pays for none.
    """

    id: int
    command: str
    session_id: str | None = None
    stream: bool = False
    #: False when the reply codec cannot carry binary (JSON): return lists, not arrays/bytes.
    binary: bool = True
    #: The caller's W3C trace context (``{"traceparent": ..., ["tracestate": ...]}``) when the
    #: host traced this call (OpenTelemetry in the gateway), else None. A bridge that uses
    #: OpenTelemetry itself can extract it as the parent of its own spans.
    trace_context: dict[str, str] | None = None
    _cancelled: bool = False
    _event: threading.Event | None = None
    _resource_states: dict[str, Any] | None = None
    _bridge_state: dict[str, Any] | None = None

    @property
    def resource_states(self) -> dict[str, Any]:
        """Resource states changed during this call (reported with its success reply so the
        host keeps them in its records); made on first use: most calls change none."""
        states = self._resource_states
        if states is None:
            states = self._resource_states = {}
        return states

    @property
    def bridge_state(self) -> dict[str, Any]:
        """Bridge-wide state set during this call (:meth:`BaseBridge.set_bridge_state`),
        reported with the success reply so the host can apply it to every worker of the pool;
        made on first use."""
        state = self._bridge_state
        if state is None:
            state = self._bridge_state = {}
        return state

    @property
    def changed_state(self) -> bool:
        """Whether this call set any resource or bridge-wide state (without making either)."""
        return bool(self._resource_states or self._bridge_state)

    @property
    def cancelled(self) -> bool:
        if self._cancelled:
            return True
        ev = self._event
        return ev is not None and ev.is_set()

    def cancel(self) -> None:
        with _EVENT_LOCK:
            self._cancelled = True
            if self._event is not None:
                self._event.set()

    @property
    def cancel_event(self) -> threading.Event:
        """An event set when the call is cancelled (for handlers that wait or pass it on)."""
        ev = self._event
        if ev is None:
            with _EVENT_LOCK:
                ev = self._event
                if ev is None:
                    ev = threading.Event()
                    if self._cancelled:
                        ev.set()
                    self._event = ev
        return ev


@dataclass(slots=True)
class ResourceType:
    """How a bridge builds, runs and describes one kind of resource."""

    name: str
    create: Callable[[dict[str, Any], Any], Any]  # (config, state or None) -> live object
    execute: Callable[[Any, dict[str, Any]], Any] | None = None  # (obj, inputs) -> result
    describe: Callable[[Any], dict[str, Any]] | None = None  # extra info for list/get
    dump_state: Callable[[Any], Any] | None = None  # after a state-changing command
    close: Callable[[Any], None] | None = None
    #: (obj, inputs) -> iterator of chunks; a generator's return value is the final result.
    #: Used for ``execute_resource`` requests sent with ``"stream": true``.
    stream: Callable[[Any, dict[str, Any]], Iterator[Any]] | None = None


@dataclass(slots=True)
class ResourceRecord:
    id: str
    type: str
    config: dict[str, Any]
    obj: Any
    session_id: str | None = None
    created_at: float = field(default_factory=time.time)
    execution_count: int = 0
    last_executed: float | None = None

    def summary(self, rtype: ResourceType) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "resource_id": self.id,
            "type": self.type,
            "config": self.config,
            "session_id": self.session_id,
            "created_at": self.created_at,
            "execution_count": self.execution_count,
            "last_executed": self.last_executed,
        }
        if rtype.describe is not None:
            out.update(rtype.describe(self.obj))
        return out


@dataclass(slots=True)
class _CommandStats:
    count: int = 0
    errors: int = 0
    total_s: float = 0.0
    max_s: float = 0.0


class BaseBridge:
    """Subclass this to bridge a framework. Override the three hooks; register handlers."""

    #: Framework name: the command namespace (``<name>:<command>``) and the built-in bridge name.
    #: Left empty, it is taken from ``get_framework_info()["name"]`` at :meth:`setup`.
    name: str = ""

    #: Commands whose result depends only on their arguments: the host may keep their results
    #: in its result cache (when ``cache_ttl`` is configured). ``register_handler(...,
    #: cacheable=True)`` adds to it; the worker announces the union in its ``hello`` reply.
    cacheable_commands: ClassVar[frozenset[str]] = frozenset()

    #: Whether workers of this bridge may be forked from a warm template (``start = "fork"``).
    #: Set False when importing the bridge's module leaves state a fork must not copy (threads,
    #: open connections, a GPU context): the pool then spawns its workers, with a log line.
    fork_safe: ClassVar[bool] = True
    #: Modules a fork template imports before forking (the default :meth:`preload_framework`).
    fork_preload: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def preload_framework(cls, settings: Mapping[str, Any]) -> None:
        """In a fork template only (``start = "fork"``): import, once, what every worker would
        import in ``_initialize_framework``. It must start no thread and touch no GPU (the
        template then refuses to fork); per-worker state belongs in ``_initialize_framework``,
        which still runs in each forked worker. The default imports :attr:`fork_preload`."""
        import importlib

        for module in cls.fork_preload:
            importlib.import_module(module)

    def __init__(
        self,
        mode: str = "standalone",
        worker_id: str | None = None,
        *,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.settings: dict[str, Any] = dict(settings or {})
        self.mode = mode
        #: Set at :meth:`setup` when not given (``<name>-<pid>``).
        self.worker_id: str = worker_id or ""
        self.start_time = time.time()
        #: Live counters of the original design; :meth:`statistics` reads the same numbers.
        self.stats: dict[str, Any] = {
            "requests_processed": 0,
            "errors": 0,
            "start_time": datetime.fromtimestamp(self.start_time, UTC).isoformat(),
        }
        #: Bridge-wide state applied here (by :meth:`apply_bridge_state`'s default).
        self.bridge_state: dict[str, Any] = {}
        self._handlers: dict[str, Handler] = {}
        self._control_handlers: dict[str, Handler] = {}
        self._cacheable: set[str] = set(type(self).cacheable_commands)
        self._resource_types: dict[str, ResourceType] = {}
        self.resources: dict[str, ResourceRecord] = {}
        self._cleanup_callbacks: list[Callable[[], None]] = []
        self._cleanup_runs = 0
        self._stats: dict[str, _CommandStats] = {}
        self._call: CallContext | None = None
        self.host: HostClient | None = None  # set by the runtime: calls back through the host
        self._set_up = False

    @property
    def requests_processed(self) -> int:
        return int(self.stats["requests_processed"])

    @property
    def error_count(self) -> int:
        return int(self.stats["errors"])

    # ----------------------------------------------------------------- hooks for subclasses
    def _initialize_framework(self) -> None:
        """Import and configure the framework. Raise to fail the worker's boot."""

    def _register_handlers(self) -> Mapping[str, Handler] | None:
        """Register the bridge's commands with :meth:`register_handler`, or return a mapping
        ``command -> handler`` (the original style); both may be combined."""
        return None

    def get_framework_info(self) -> dict[str, Any]:
        """Name, version and capabilities of the framework this bridge serves."""
        return {"name": self.name, "version": None}

    def ping_info(self) -> dict[str, Any]:
        """Extra fields for ``ping`` replies (must be cheap: may run beside a long call)."""
        return {}

    def apply_bridge_state(self, key: str, value: Any) -> None:
        """Apply one piece of bridge-wide state in this worker (default: keep it in
        :attr:`bridge_state`). Override to act on it, e.g. configure the framework's LM."""
        self.bridge_state[key] = value

    # ----------------------------------------------------------------- registration
    def register_handler(
        self, command: str, handler: Handler, *, control: bool = False, cacheable: bool = False
    ) -> None:
        """Serve ``command`` with ``handler``. ``cacheable``: its result depends only on its
        arguments (no side effects), so the host may answer a repeat from its result cache."""
        if not isinstance(command, str) or not command:
            raise ConfigError(f"command names must be non-empty strings, got {command!r}")
        if ":" in command:
            raise ConfigError(
                f"command {command!r} is registered with a namespace; register "
                f"{command.rpartition(':')[2]!r}: it is served as '<bridge>:<cmd>' and "
                "'common:<cmd>' for free"
            )
        if not callable(handler):
            raise ConfigError(
                f"the handler for command {command!r} is not callable ({handler!r}); map each "
                "command to a function taking the request's args dict"
            )
        (self._control_handlers if control else self._handlers)[command] = handler
        if cacheable:
            self._cacheable.add(command)

    def register_resource_type(self, rtype: ResourceType) -> None:
        self._resource_types[rtype.name] = rtype

        def create(args: dict[str, Any]) -> dict[str, Any]:
            return self._create(rtype, args)

        def list_of_type(args: dict[str, Any]) -> dict[str, Any]:
            return self._list(args, only_type=rtype.name)

        self.register_handler(f"create_{rtype.name}", create)
        self.register_handler(f"list_{rtype.name}s", list_of_type)

    def on_cleanup(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on ``cleanup`` and when the worker shuts down."""
        self._cleanup_callbacks.append(callback)

    def setup(self) -> None:
        """Initialise the framework and register every handler (the runtime calls this once).

        Order: ``_initialize_framework``, then the name (see :attr:`name`), then the common
        handlers, then ``_register_handlers`` (whose registrations and returned mapping may
        replace common ones). Any inconsistency is a :class:`ConfigError` naming the culprit.
        """
        if self._set_up:
            return
        self._initialize_framework()
        self._resolve_name()
        if not self.worker_id:
            self.worker_id = f"{self.name}-{os.getpid()}"
        common: dict[str, Handler] = {
            "get_info": self.get_info,
            "get_stats": self.get_stats,
            "cleanup": self.cleanup,
            "execute_resource": self._h_execute_resource,
            "delete_resource": self._h_delete_resource,
            "list_resources": lambda a: self._list(a, only_type=a.get("type")),
            "get_resource": self._h_get_resource,
            "list_commands": lambda a: {"commands": self.commands()},
            "apply_bridge_state": self._h_apply_bridge_state,
        }
        for cmd, h in common.items():
            self.register_handler(cmd, h)
        self.register_handler("ping", self.ping, control=True)
        self.register_handler("heartbeat", self._h_heartbeat, control=True)
        returned = self._register_handlers()
        if returned is not None:
            if not isinstance(returned, Mapping):
                raise ConfigError(
                    f"{type(self).__name__}._register_handlers() returned "
                    f"{type(returned).__name__}; return None (after register_handler calls) or "
                    "a dict of command -> handler"
                )
            for cmd, h in returned.items():
                # ping/heartbeat stay control commands whoever implements them.
                self.register_handler(cmd, h, control=cmd in self._control_handlers)
        self._set_up = True

    def _resolve_name(self) -> None:
        declared = type(self).name
        info = self.get_framework_info()
        info_name = info.get("name") if isinstance(info, Mapping) else None
        if declared:
            if info_name is not None and info_name != declared:
                raise ConfigError(
                    f"{type(self).__name__} sets name = {declared!r} but get_framework_info() "
                    f"reports name {info_name!r}; they must agree (the name is the command "
                    "namespace): drop one of them or make them equal"
                )
            self.name = declared
        elif isinstance(info_name, str) and info_name:
            if ":" in info_name:
                raise ConfigError(
                    f"get_framework_info() of {type(self).__name__} reports name {info_name!r}, "
                    "which cannot be a command namespace (no ':' allowed)"
                )
            self.name = info_name
        else:
            self.name = "base"

    def commands(self) -> list[str]:
        return sorted({*self._handlers, *self._control_handlers})

    def cacheable(self) -> list[str]:
        """The registered commands declared cacheable (see :attr:`cacheable_commands`)."""
        return sorted(c for c in self._cacheable if c in self._handlers)

    # ----------------------------------------------------------------- the current call
    @property
    def call(self) -> CallContext:
        if self._call is None:
            raise RuntimeError("no call in progress (call is only set inside a handler)")
        return self._call

    def check_cancelled(self) -> None:
        """Raise :class:`CancelledCallError` if the current call was cancelled."""
        call = self._call
        if call is not None and call.cancelled:
            raise CancelledCallError(f"call {call.id} ({call.command}) was cancelled")

    def set_bridge_state(self, key: str, value: Any) -> None:
        """Make ``key = value`` bridge-wide: apply it here now (:meth:`apply_bridge_state`) and,
        inside a call, report it with that call's success reply so the host applies it to every
        current, replacement and overflow worker. A failing call reports nothing."""
        if not isinstance(key, str) or not key:
            raise InvalidRequestError(f"bridge state keys are non-empty strings, got {key!r}")
        self.apply_bridge_state(key, value)
        call = self._call
        if call is not None:
            call.bridge_state[key] = value

    # ----------------------------------------------------------------- dispatch
    def resolve(self, command: str) -> tuple[Handler, bool]:
        """Map a (possibly namespaced) command to its handler; ``(handler, is_control)``."""
        ns, sep, name = command.partition(":")
        if sep:
            if ns not in ("common", self.name):
                raise UnknownCommandError(
                    f"unknown namespace {ns!r} in {command!r}: this worker runs the "
                    f"{self.name!r} bridge, so use 'common:<cmd>' or '{self.name}:<cmd>'",
                    namespace=ns,
                )
        else:
            name = command
        h = self._control_handlers.get(name)
        if h is not None:
            return h, True
        h = self._handlers.get(name)
        if h is None:
            raise UnknownCommandError(
                f"unknown command {name!r} for the {self.name!r} bridge; "
                f"known commands: {', '.join(self.commands())}",
                command=name,
            )
        return h, False

    def dispatch(
        self, call: CallContext, args: dict[str, Any], handler: Handler | None = None
    ) -> Any:
        """Run ``call`` (with ``handler`` when the runtime already resolved it) on this thread."""
        if handler is None:
            handler, _ = self.resolve(call.command)
        self._call = call
        try:
            return handler(args)
        finally:
            self._call = None

    def record(self, command: str, seconds: float, ok: bool) -> None:
        st = self._stats.get(command)
        if st is None:
            st = self._stats[command] = _CommandStats()
        st.count += 1
        st.total_s += seconds
        if seconds > st.max_s:
            st.max_s = seconds
        stats = self.stats
        stats["requests_processed"] += 1
        if not ok:
            st.errors += 1
            stats["errors"] += 1

    def run_cleanup(self) -> int:
        """Close every resource and run the ``on_cleanup`` callbacks; the number removed."""
        self._cleanup_runs += 1
        removed = len(self.resources)
        for rec in list(self.resources.values()):
            self._close(rec)
        self.resources.clear()
        for cb in self._cleanup_callbacks:
            try:
                cb()
            except Exception as exc:  # cleanup must go on; report on stderr
                sys.stderr.write(f"mlbridge worker: cleanup callback failed: {exc!r}\n")
        return removed

    def shutdown(self) -> None:
        """The worker is leaving: run :meth:`cleanup` (the subclass's, when overridden), and the
        base cleanup too if that override did not call it."""
        runs = self._cleanup_runs
        try:
            self.cleanup({})
        except Exception as exc:
            sys.stderr.write(f"mlbridge worker: cleanup at shutdown failed: {exc!r}\n")
        if self._cleanup_runs == runs:
            self.run_cleanup()

    def run(self, argv: list[str] | None = None) -> None:
        """Serve this bridge on the process's stdin/stdout, like ``python -m mlbridge.worker``.

        For a script ending in ``if __name__ == "__main__": MyBridge().run()``, launched as
        ``python my_bridge.py --mode pool-worker --worker-id w1``. It parses ``argv`` (default
        ``sys.argv[1:]``: ``--mode``, ``--worker-id`` and the worker's other options), protects
        stdout, applies limits, then runs :meth:`setup` and the serve loop, and ends the process
        with the worker's exit code (0 when the input closes) once the input closes.
        """
        from .._worker.entry import run_instance

        run_instance(self, sys.argv[1:] if argv is None else argv)

    # ----------------------------------------------------------------- common handlers
    def ping(self, args: dict[str, Any]) -> dict[str, Any]:
        """``ping``: liveness. Runs on whichever thread reads, beside a long call: keep it cheap."""
        out = {
            "status": "ok",
            "timestamp": time.time(),
            "uptime": time.time() - self.start_time,
            "mode": self.mode,
            "worker_id": self.worker_id,
            "framework": self.name,
            "pid": os.getpid(),
        }
        out.update(self.ping_info())
        return out

    def _h_heartbeat(self, args: dict[str, Any]) -> dict[str, Any]:
        busy = self._call
        return {
            "status": "ok",
            "pid": os.getpid(),
            "rss_bytes": rss_bytes(),
            "busy": busy is not None,
            "current_command": busy.command if busy else None,
            "active_resources": len(self.resources),
            "requests_processed": self.requests_processed,
        }

    def get_info(self, args: dict[str, Any]) -> dict[str, Any]:
        """``get_info``: the framework info and this worker's bridge, commands and interpreter."""
        return {
            "framework": self.get_framework_info(),
            "bridge": self.name,
            "worker_id": self.worker_id,
            "mode": self.mode,
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "commands": self.commands(),
            "cacheable": self.cacheable(),
            "resource_types": sorted(self._resource_types),
            "isolation": isolation_report(),  # limits and how they are enforced, or None
        }

    def statistics(self) -> dict[str, Any]:
        uptime = time.time() - self.start_time
        per_cmd = {
            cmd: {
                "count": s.count,
                "errors": s.errors,
                "total_s": s.total_s,
                "mean_ms": (s.total_s / s.count * 1000.0) if s.count else 0.0,
                "max_ms": s.max_s * 1000.0,
            }
            for cmd, s in self._stats.items()
        }
        # Counters a bridge added to self.stats come first; the runtime's own keys win.
        out = {k: v for k, v in self.stats.items() if k != "start_time"}
        out.update(
            {
                "requests_processed": self.requests_processed,
                "errors": self.error_count,
                "error_count": self.error_count,
                "start_time": self.start_time,
                "started_at": self.stats["start_time"],
                "uptime": uptime,
                "rss_bytes": rss_bytes(),
                "pid": os.getpid(),
                "worker_id": self.worker_id,
                "active_resources": len(self.resources),
                "commands": per_cmd,
            }
        )
        return out

    def get_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        """``get_stats``: :meth:`statistics` (override to add or reshape)."""
        return self.statistics()

    def cleanup(self, args: dict[str, Any]) -> dict[str, Any]:
        """``cleanup``, and at shutdown: close resources, run ``on_cleanup`` callbacks."""
        return {"status": "cleaned", "resources_removed": self.run_cleanup()}

    def _h_apply_bridge_state(self, args: dict[str, Any]) -> dict[str, Any]:
        state = args.get("state")
        if not isinstance(state, dict):
            raise InvalidRequestError(
                "apply_bridge_state: 'state' must be an object of key -> value, "
                f"got {type(state).__name__}"
            )
        applied: list[str] = []
        for key, value in state.items():
            if not isinstance(key, str) or not key:
                raise InvalidRequestError(
                    f"apply_bridge_state: keys are non-empty strings, got {key!r} "
                    f"(applied before it: {applied})"
                )
            self.apply_bridge_state(key, value)
            applied.append(key)
        return {"applied": applied}

    # ----------------------------------------------------------------- resources
    def _create(self, rtype: ResourceType, args: dict[str, Any]) -> dict[str, Any]:
        config = args.get("config")
        if config is None:
            config = {k: v for k, v in args.items() if k not in RESERVED_CREATE_KEYS}
        if not isinstance(config, dict):
            raise InvalidRequestError(
                f"create_{rtype.name}: 'config' must be an object, got {type(config).__name__}"
            )
        rid = args.get("resource_id") or args.get("id") or f"{rtype.name}_{uuid.uuid4().hex[:12]}"
        rid = str(rid)
        obj = rtype.create(config, args.get("state"))
        old = self.resources.get(rid)
        if old is not None:
            self._close(old)
        session_id = args.get("session_id")
        if session_id is None and self._call is not None:
            session_id = self._call.session_id
        rec = ResourceRecord(rid, rtype.name, config, obj, session_id)
        self.resources[rid] = rec
        out = rec.summary(rtype)
        out["status"] = "created"
        return out

    def get_resource(self, resource_id: Any, type_name: str | None = None) -> ResourceRecord:
        rec = self.resources.get(str(resource_id)) if resource_id is not None else None
        if rec is None or (type_name is not None and rec.type != type_name):
            what = type_name or "resource"
            raise ResourceNotFoundError(
                f"no {what} with id {resource_id!r} in worker {self.worker_id}; create it first "
                f"(create_{type_name or '<type>'}) or, through the host, it is rebuilt for you",
                resource_id=str(resource_id),
            )
        return rec

    def _h_execute_resource(self, args: dict[str, Any]) -> Any:
        rec = self.get_resource(args.get("resource_id"))
        rtype = self._resource_types[rec.type]
        inputs = args.get("inputs", {})
        if not isinstance(inputs, dict):
            raise InvalidRequestError("execute_resource: 'inputs' must be an object")
        call = self._call
        if rtype.stream is not None and (rtype.execute is None or (call and call.stream)):
            return self._stream_resource(rec, rtype, rtype.stream, inputs)
        if rtype.execute is None:
            raise InvalidRequestError(f"{rec.type} resources cannot be executed")
        result = rtype.execute(rec.obj, inputs)
        self._executed(rec, rtype)
        return result

    def _stream_resource(
        self,
        rec: ResourceRecord,
        rtype: ResourceType,
        stream: Callable[[Any, dict[str, Any]], Iterator[Any]],
        inputs: dict[str, Any],
    ) -> Generator[Any, None, Any]:
        """Chunks of ``stream(obj, inputs)``, then its return value; the runtime checks for
        cancellation between chunks. Counted and state reported once it has finished."""
        # A generator's return value is the final result; a plain iterator's is None.
        items = cast("Generator[Any, None, Any]", stream(rec.obj, inputs))
        final = yield from items
        self._executed(rec, rtype)
        return final

    def _executed(self, rec: ResourceRecord, rtype: ResourceType) -> None:
        rec.execution_count += 1
        rec.last_executed = time.time()
        if rtype.dump_state is not None and self._call is not None:
            self._call.resource_states[rec.id] = rtype.dump_state(rec.obj)

    def mark_state_changed(self, resource_id: str) -> None:
        """Report a resource's new saved state to the host with the current reply."""
        rec = self.get_resource(resource_id)
        rtype = self._resource_types[rec.type]
        if rtype.dump_state is not None and self._call is not None:
            self._call.resource_states[rec.id] = rtype.dump_state(rec.obj)

    def patch_resource_state(self, resource_id: str, path: list[str], value: Any) -> None:
        """Report a change to one part of a resource's saved state (``path``: keys into its
        nested objects; ``value`` None removes it) with the current reply. The host merges it
        into its record, so calls on other workers changing other parts lose nothing (a whole
        state, as :meth:`mark_state_changed` reports it, replaces the record)."""
        call = self._call
        if call is None:
            return
        entry = call.resource_states.setdefault(resource_id, {"$patch": []})
        patch = entry.get("$patch") if isinstance(entry, dict) and len(entry) == 1 else None
        if isinstance(patch, list):  # a whole state reported in this call already wins
            patch.append([list(path), value])

    def _h_delete_resource(self, args: dict[str, Any]) -> dict[str, Any]:
        rid = args.get("resource_id")
        rec = self.resources.pop(str(rid), None)
        if rec is None:
            if args.get("missing_ok"):
                return {"resource_id": rid, "status": "absent"}
            raise ResourceNotFoundError(f"no resource with id {rid!r} to delete", resource_id=rid)
        self._close(rec)
        return {"resource_id": rec.id, "status": "deleted"}

    def _h_get_resource(self, args: dict[str, Any]) -> dict[str, Any]:
        rec = self.get_resource(args.get("resource_id"))
        return rec.summary(self._resource_types[rec.type])

    def _list(self, args: dict[str, Any], *, only_type: str | None) -> dict[str, Any]:
        session = args.get("session_id")
        items = [
            rec.summary(self._resource_types[rec.type])
            for rec in self.resources.values()
            if (only_type is None or rec.type == only_type)
            and (session is None or rec.session_id == session)
        ]
        return {"resources": items, "total_count": len(items)}

    def _close(self, rec: ResourceRecord) -> None:
        rtype = self._resource_types.get(rec.type)
        if rtype is not None and rtype.close is not None:
            try:
                rtype.close(rec.obj)
            except Exception as exc:
                sys.stderr.write(f"mlbridge worker: closing {rec.id} failed: {exc!r}\n")

    def iter_stream(self, it: Iterator[Any]) -> Iterator[Any]:
        """Wrap an iterator so it stops with :class:`CancelledCallError` once cancelled."""
        for item in it:
            self.check_cancelled()
            yield item


def rss_bytes() -> int:
    """Resident set size of this process, cheaply (reads /proc; falls back to psutil)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
