"""A pool's policy as pure functions of its state: grow, recycle, retire, replace, mark broken.

Nothing here touches a process, a future or the clock: the pool passes in plain facts (counts,
a worker's age and request count, ``now``) and acts on the decision. Each rule is written once,
used by every code path that needs it (a call's release on the loop or on a caller thread, the
supervisor's heartbeat round), and unit-tested without processes (tests/test_pool_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .._units import format_size
from ..config import BridgeOptions

__all__ = [
    "Growth",
    "PoolCounts",
    "WorkerFacts",
    "boot_verdict",
    "growth",
    "missing_core",
    "recycle_reason",
    "restart_delay",
    "retire_idle_overflow",
]

Growth = Literal["core", "overflow"] | None


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    requests: int  # calls served, counting the one being released
    age: float  # seconds since it became ready
    rss_bytes: int  # last measured resident memory (0: unknown)
    overflow: bool = False
    idle_for: float = 0.0  # seconds since its last call ended


@dataclass(frozen=True, slots=True)
class PoolCounts:
    workers: int  # live workers (core + overflow)
    core: int  # live core workers
    starting: int  # workers being started now
    pool_size: int
    overflow: int


def recycle_reason(w: WorkerFacts, opts: BridgeOptions) -> str | None:
    """Why this worker should be replaced by a fresh one now (None: keep it)."""
    if opts.max_requests and w.requests >= opts.max_requests:
        return f"served max_requests={opts.max_requests}"
    if opts.max_age and w.age >= opts.max_age:
        return f"older than max_age={opts.max_age:g}s"
    if opts.max_memory and w.rss_bytes > opts.max_memory:
        return f"RSS {w.rss_bytes / 1e6:.0f} MB over max_memory={format_size(opts.max_memory)}"
    return None


def growth(c: PoolCounts) -> Growth:
    """A caller found no idle worker: start one more (core or overflow), or none (full)."""
    core_size = max(c.pool_size, 1)
    if c.workers + c.starting >= core_size + c.overflow:
        return None
    return "overflow" if c.workers + c.starting >= core_size else "core"


def missing_core(c: PoolCounts) -> int:
    """Core workers to (re)start: pool_size minus live and starting core workers."""
    return max(c.pool_size, 1) - c.core - c.starting


def restart_delay(crash_streak: int, boot_failures: int, backoff: float) -> float:
    """The pause before replacing workers: none after a clean exit, ``backoff`` after a crash
    or failed boot (the caller doubles it up to max_restart_backoff while failures go on)."""
    return backoff if (crash_streak or boot_failures) else 0.0


def boot_verdict(boot_failures: int, max_boot_failures: int, definitive: bool) -> bool:
    """Whether consecutive boot failures make the bridge broken (no more restarts).

    ``definitive``: the worker exited with a named boot-failure code (bad import, bad config),
    which will not fix itself: two in a row are enough.
    """
    return boot_failures >= max_boot_failures or (definitive and boot_failures >= 2)


def retire_idle_overflow(w: WorkerFacts, opts: BridgeOptions) -> str | None:
    if w.overflow and w.idle_for >= opts.idle_timeout:
        return f"idle overflow worker for {opts.idle_timeout:g}s"
    return None


def overflow_on_arrival(core: int, pool_size: int) -> bool:
    """A worker finished booting: it is overflow when the core is already full."""
    return core >= max(pool_size, 1)
