"""Telemetry: typed events, hooks, and a Prometheus text exposition.

Events are small frozen dataclasses emitted on the host's loop thread. Hooks registered with
:meth:`Telemetry.add_hook` are called synchronously for every event: they must be quick (a hook
that raises is logged and otherwise ignored, so telemetry never breaks a call).

Bounded cardinality: command names come from callers, so they are not used as statistics keys or
Prometheus labels as they are. A call refused because its command (or namespace) is unknown
counts under :data:`UNREGISTERED`. Any other command keeps its own series once it has succeeded
(only a registered handler can succeed), and before that only while its framework has fewer
than ``max_commands`` series; past that, failures of never-succeeded commands (say, timeouts of
junk names) count under :data:`OTHER`. Hooks still see every event as it happened.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OTHER",
    "UNREGISTERED",
    "Emitter",
    "Event",
    "HealthEvent",
    "RequestEvent",
    "Telemetry",
    "WorkerEvent",
    "prometheus_text",
]

log = logging.getLogger("mlbridge.host")

#: The command label of calls refused as an unknown command or namespace.
UNREGISTERED = "<unregistered>"
#: The command label of other failures once a framework has ``max_commands`` series.
OTHER = "<other>"
#: Error codes that mean "no such command here" (the worker never ran anything).
_UNKNOWN_COMMAND_CODES = frozenset({"unknown_command", "invalid_namespace"})


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


Event = RequestEvent | WorkerEvent | HealthEvent
Emitter = Callable[[Event], None]
Hook = Callable[[Event], Any]


class Telemetry:
    def __init__(self, *, max_commands: int = 200) -> None:
        self.max_commands = max_commands
        self._hooks: list[Hook] = []
        # Events from caller threads (MLBridge's direct path), delivered on the loop thread.
        self._backlog: deque[Event] = deque()
        # (framework, command, success) -> [count, total seconds]
        self.request_totals: dict[tuple[str, str, bool], list[float]] = {}
        self.worker_events: dict[tuple[str, str], int] = {}
        # framework -> command labels it has (bounded as the module docstring says)
        self._commands: dict[str, set[str]] = {}

    def add_hook(self, hook: Hook) -> Callable[[], None]:
        """Call ``hook(event)`` for every event; returns a function that removes it."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook) if hook in self._hooks else None

    def emit_threadsafe(self, event: Event) -> None:
        """From any thread: queue ``event``; the loop delivers it at its next emit or drain."""
        self._backlog.append(event)

    def drain(self) -> None:
        """Loop thread: deliver events queued by other threads (called at least every second)."""
        while self._backlog:
            self._emit(self._backlog.popleft())

    def emit(self, event: Event) -> None:
        if self._backlog:
            self.drain()
        self._emit(event)

    def _emit(self, event: Event) -> None:
        if type(event) is RequestEvent:
            key = (event.framework, self._command_label(event), event.success)
            tot = self.request_totals.get(key)
            if tot is None:
                tot = self.request_totals[key] = [0, 0.0]
            tot[0] += 1
            tot[1] += event.duration_s
        elif type(event) is WorkerEvent:
            wkey = (event.framework, event.event)
            self.worker_events[wkey] = self.worker_events.get(wkey, 0) + 1
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                log.exception("telemetry hook %r failed", hook)

    def _command_label(self, event: RequestEvent) -> str:
        if not event.success and event.error_code in _UNKNOWN_COMMAND_CODES:
            return UNREGISTERED
        seen = self._commands.get(event.framework)
        if seen is None:
            seen = self._commands[event.framework] = set()
        if event.command in seen:
            return event.command
        if event.success or len(seen) < self.max_commands:
            seen.add(event.command)
            return event.command
        return OTHER


def prometheus_text(telemetry: Telemetry, stats: dict[str, Any]) -> str:
    """Prometheus text exposition (version 0.0.4) of request totals and pool/worker gauges."""
    lines = [
        "# HELP mlbridge_requests_total Calls through the host, by framework, command, outcome.",
        "# TYPE mlbridge_requests_total counter",
    ]
    for (fw, cmd, ok), (count, _) in sorted(telemetry.request_totals.items()):
        lines.append(
            f'mlbridge_requests_total{{framework="{_esc(fw)}",command="{_esc(cmd)}",'
            f'success="{str(ok).lower()}"}} {int(count)}'
        )
    lines += [
        "# HELP mlbridge_request_seconds_total Time spent in calls, by framework and command.",
        "# TYPE mlbridge_request_seconds_total counter",
    ]
    for (fw, cmd, ok), (_, secs) in sorted(telemetry.request_totals.items()):
        lines.append(
            f'mlbridge_request_seconds_total{{framework="{_esc(fw)}",command="{_esc(cmd)}",'
            f'success="{str(ok).lower()}"}} {secs:.6f}'
        )
    lines += [
        "# HELP mlbridge_worker_events_total Worker lifecycle events.",
        "# TYPE mlbridge_worker_events_total counter",
    ]
    for (fw, ev), count in sorted(telemetry.worker_events.items()):
        lines.append(f'mlbridge_worker_events_total{{framework="{_esc(fw)}",event="{ev}"}} {count}')
    lines += [
        "# HELP mlbridge_pool_workers Live workers per pool.",
        "# TYPE mlbridge_pool_workers gauge",
        "# HELP mlbridge_worker_rss_bytes Resident memory of each worker (last heartbeat).",
        "# TYPE mlbridge_worker_rss_bytes gauge",
    ]
    for name, pool in sorted(stats.get("pools", {}).items()):
        lines.append(f'mlbridge_pool_workers{{framework="{_esc(name)}"}} {len(pool["workers"])}')
        for w in pool["workers"]:
            lines.append(
                f'mlbridge_worker_rss_bytes{{framework="{_esc(name)}",worker="{_esc(w["id"])}"}} '
                f"{w['rss_bytes']}"
            )
    lines += _cache_lines(stats)
    return "\n".join(lines) + "\n"


_CACHE_COUNTERS = (
    ("hits", "Calls answered from the result cache."),
    ("misses", "Cacheable calls that ran on a worker."),
    ("evictions", "Result-cache entries dropped to stay within the bounds."),
    ("expirations", "Result-cache entries dropped after their cache_ttl."),
)


def _cache_lines(stats: dict[str, Any]) -> list[str]:
    """The result cache's counters and size, for pools that have it on (cache_ttl)."""
    pools = [
        (name, pool["cache"])
        for name, pool in sorted(stats.get("pools", {}).items())
        if isinstance(pool.get("cache"), dict) and pool["cache"].get("enabled")
    ]
    if not pools:
        return []
    lines: list[str] = []
    for key, text in _CACHE_COUNTERS:
        lines += [
            f"# HELP mlbridge_cache_{key}_total {text}",
            f"# TYPE mlbridge_cache_{key}_total counter",
        ]
        lines += [f'mlbridge_cache_{key}_total{{framework="{_esc(n)}"}} {c[key]}' for n, c in pools]
    for key, text in (("entries", "Entries in the result cache."), ("bytes", "Bytes it holds.")):
        lines += [f"# HELP mlbridge_cache_{key} {text}", f"# TYPE mlbridge_cache_{key} gauge"]
        lines += [f'mlbridge_cache_{key}{{framework="{_esc(n)}"}} {c[key]}' for n, c in pools]
    return lines


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
