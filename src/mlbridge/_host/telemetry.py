"""Telemetry: typed events, hooks and running totals (exposed to Prometheus by :mod:`.prometheus`).

Events are small frozen dataclasses emitted on the host's loop thread. Hooks registered with
:meth:`Telemetry.add_hook` are called synchronously for every event: they must be quick (a hook
that raises is logged and otherwise ignored, so telemetry never breaks a call).

What is kept per event: request counts and seconds by (framework, command, success), a latency
histogram by (framework, command), failures by (framework, error kind), a checkout-wait
histogram by framework and worker lifecycle counts by (framework, event). :class:`HostCollector`
turns those, plus a statistics snapshot read at scrape time (workers by state, RSS per worker,
restarts, queue depth, pool state), into ``prometheus-client`` metric families
(:mod:`.prometheus`).

Bounded cardinality: command names come from callers, so they are not used as statistics keys or
Prometheus labels as they are. A call refused because its command (or namespace) is unknown
counts under :data:`UNREGISTERED`. Any other command keeps its own series once it has succeeded
(only a registered handler can succeed), and before that only while its framework has fewer
than ``max_commands`` series; past that, failures of never-succeeded commands (say, timeouts of
junk names) count under :data:`OTHER`. Error kinds are capped the same way (``max_kinds``). A
refused unknown command ran nothing, so it has no latency sample. Label values are framework
names, the bounded command labels, error codes, worker ids and fixed words: never arguments,
settings or anything secret. Hooks still see every event as it happened.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LATENCY_BUCKETS",
    "OTHER",
    "UNREGISTERED",
    "DirectRecorder",
    "Emitter",
    "Event",
    "HealthEvent",
    "ProgressEvent",
    "RequestEvent",
    "RequestRecord",
    "RequestRecorder",
    "Telemetry",
    "WorkerEvent",
]

log = logging.getLogger("mlbridge.host")

#: The command label of calls refused as an unknown command or namespace.
UNREGISTERED = "<unregistered>"
#: The command (or error kind) label of other failures once a framework has its maximum.
OTHER = "<other>"
#: Error codes that mean "no such command here" (the worker never ran anything).
_UNKNOWN_COMMAND_CODES = frozenset({"unknown_command", "invalid_namespace"})
#: Upper bounds (seconds) of the latency and checkout-wait histograms' buckets.
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0)


@dataclass(frozen=True, slots=True)
class RequestEvent:
    framework: str
    command: str
    duration_s: float
    success: bool
    worker_id: str | None = None
    error_code: str | None = None
    session_id: str | None = None
    time: float = field(default_factory=time.time)
    kind: str = "request"
    #: seconds spent waiting for a free worker (part of ``duration_s``)
    checkout_wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    framework: str
    worker_id: str
    pid: int | None
    event: str  # started, ready, boot_failed, exited, stopped, recycled, retired, broken
    reason: str | None = None
    exit_code: int | None = None
    time: float = field(default_factory=time.time)
    kind: str = "worker"


@dataclass(frozen=True, slots=True)
class HealthEvent:
    framework: str
    worker_id: str
    pid: int | None
    rss_bytes: int
    active_resources: int
    busy: bool
    time: float = field(default_factory=time.time)
    kind: str = "health"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """Progress of slow preparation before a pool starts (building a bridge's environment)."""

    framework: str
    task: str  # "environment"
    step: int
    total: int
    message: str
    time: float = field(default_factory=time.time)
    kind: str = "progress"


Event = RequestEvent | WorkerEvent | HealthEvent | ProgressEvent
#: A RequestEvent's fields in order (``time`` and ``checkout_wait_s`` included), as queued and
#: counted: the event itself is built only for hooks.
RequestRecord = tuple[str, str, float, bool, str | None, str | None, str | None, float, float]
Emitter = Callable[[Event], None]
#: ``Telemetry.request``: (framework, command, duration_s, success, worker_id, error_code,
#: session_id, checkout_wait_s)
RequestRecorder = Callable[[str, str, float, bool, str | None, str | None, str | None, float], None]
#: ``Telemetry.request_threadsafe``: (framework, command, duration_s, success, worker_id,
#: error_code)
DirectRecorder = Callable[[str, str, float, bool, str | None, str | None], None]
Hook = Callable[[Event], Any]


_bucket = bisect.bisect_left
#: queued request records are counted at least this often (see Telemetry.request)
BATCH = 512


class _Histogram:
    """Bucket counts (not cumulative), sum and count of one series."""

    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.count += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.buckets, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class Telemetry:
    def __init__(self, *, max_commands: int = 200, max_kinds: int = 50) -> None:
        self.max_commands = max_commands
        self.max_kinds = max_kinds
        self._hooks: list[Hook] = []
        # Events from caller threads (MLBridge's direct path), delivered on the loop thread.
        self._backlog: deque[RequestRecord] = deque()
        # Set by the host once its loop runs: asks the loop to drain soon (used only while
        # hooks are registered, so a hook sees a direct call's event within a loop turn).
        self.wake: Callable[[], None] | None = None
        # (framework, command, success) -> [count, total seconds]
        self.request_totals: dict[tuple[str, str, bool], list[float]] = {}
        # (framework, command) -> latency of the calls that ran
        self.latency: dict[tuple[str, str], _Histogram] = {}
        # framework -> time spent waiting for a free worker
        self.checkout_wait: dict[str, _Histogram] = {}
        # (framework, error kind) -> failures
        self.errors: dict[tuple[str, str], int] = {}
        self.worker_events: dict[tuple[str, str], int] = {}
        # framework -> command labels it has (bounded as the module docstring says)
        self._commands: dict[str, set[str]] = {}
        self._kinds: dict[str, set[str]] = {}
        # (framework, command) of a command that succeeded -> what its successes update: the
        # common case costs one lookup (keys are registered commands only, so bounded)
        self._ok: dict[tuple[str, str], tuple[list[float], _Histogram, _Histogram]] = {}

    def add_hook(self, hook: Hook) -> Callable[[], None]:
        """Call ``hook(event)`` for every event; returns a function that removes it."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook) if hook in self._hooks else None

    def request(
        self,
        framework: str,
        command: str,
        duration_s: float,
        success: bool,
        worker_id: str | None,
        error_code: str | None = None,
        session_id: str | None = None,
        checkout_wait_s: float = 0.0,
    ) -> None:
        """Loop thread: one call ended (every call passes here). With hooks listening, the
        :class:`RequestEvent` is built and delivered now; else the fields are queued and
        counted in batches (:meth:`drain`: every :data:`BATCH` calls, every second, and
        before any statistics are read), off the call's path."""
        record = (
            framework,
            command,
            duration_s,
            success,
            worker_id,
            error_code,
            session_id,
            time.time(),
            checkout_wait_s,
        )
        backlog = self._backlog
        if self._hooks:
            if backlog:
                self.drain()
            self._request(record)
            return
        backlog.append(record)
        if len(backlog) >= BATCH:
            self.drain()

    def request_threadsafe(
        self,
        framework: str,
        command: str,
        duration_s: float,
        success: bool,
        worker_id: str | None,
        error_code: str | None = None,
    ) -> None:
        """From any thread (the blocking API's direct call): :meth:`request`, queued for the
        loop (drained at its next call, every second, and at once when hooks listen)."""
        self._backlog.append(
            (framework, command, duration_s, success, worker_id, error_code, None, time.time(), 0.0)
        )
        if self._hooks and self.wake is not None:
            self.wake()

    def drain(self) -> None:
        """Loop thread: count (and deliver to hooks) the queued request records (called at
        least every second)."""
        backlog = self._backlog
        while backlog:
            self._request(backlog.popleft())

    def emit(self, event: Event) -> None:
        if self._backlog:
            self.drain()
        self._emit(event)

    def _emit(self, event: Event) -> None:
        if type(event) is RequestEvent:
            self._count_request(
                event.framework,
                event.command,
                event.duration_s,
                event.success,
                event.error_code,
                event.checkout_wait_s,
            )
        elif type(event) is WorkerEvent:
            wkey = (event.framework, event.event)
            self.worker_events[wkey] = self.worker_events.get(wkey, 0) + 1
        self._call_hooks(event)

    def _call_hooks(self, event: Event) -> None:
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                log.exception("telemetry hook %r failed", hook)

    def _request(self, r: RequestRecord) -> None:
        self._count_request(r[0], r[1], r[2], r[3], r[5], r[8])
        if self._hooks:
            self._call_hooks(RequestEvent(*r[:7], time=r[7], checkout_wait_s=r[8]))

    def _count_request(
        self,
        fw: str,
        command: str,
        duration_s: float,
        success: bool,
        error_code: str | None,
        checkout_wait_s: float,
    ) -> None:
        if success:
            fast = self._ok.get((fw, command))
            if fast is not None:
                counts, lat, waits = fast
                counts[0] += 1
                counts[1] += duration_s
                lat.buckets[_bucket(LATENCY_BUCKETS, duration_s)] += 1
                lat.count += 1
                lat.total += duration_s
                waits.buckets[_bucket(LATENCY_BUCKETS, checkout_wait_s)] += 1
                waits.count += 1
                waits.total += checkout_wait_s
                return
        label = self.command_label(fw, command, success, error_code)
        key = (fw, label, success)
        tot = self.request_totals.get(key)
        if tot is None:
            tot = self.request_totals[key] = [0, 0.0]
        tot[0] += 1
        tot[1] += duration_s
        if label != UNREGISTERED:
            hist = self.latency.get((fw, label))
            if hist is None:
                hist = self.latency[(fw, label)] = _Histogram()
            hist.observe(duration_s)
        wait = self.checkout_wait.get(fw)
        if wait is None:
            wait = self.checkout_wait[fw] = _Histogram()
        wait.observe(checkout_wait_s)
        if success:
            self._ok[(fw, label)] = (tot, self.latency[(fw, label)], wait)
        else:
            ekey = (fw, self._kind_label(fw, error_code or "unknown"))
            self.errors[ekey] = self.errors.get(ekey, 0) + 1

    def command_label(
        self, framework: str, command: str, success: bool, error_code: str | None
    ) -> str:
        """The bounded label a call's command counts under (registering it when allowed)."""
        if not success and error_code in _UNKNOWN_COMMAND_CODES:
            return UNREGISTERED
        seen = self._commands.get(framework)
        if seen is None:
            seen = self._commands[framework] = set()
        if command in seen:
            return command
        if success or len(seen) < self.max_commands:
            seen.add(command)
            return command
        return OTHER

    def _kind_label(self, framework: str, kind: str) -> str:
        seen = self._kinds.setdefault(framework, set())
        if kind in seen:
            return kind
        if len(seen) < self.max_kinds:
            seen.add(kind)
            return kind
        return OTHER
