"""Frozen statistics snapshots of the host, its pools and their workers.

``statistics()`` returns a :class:`HostStatistics`: immutable, safe to keep or hand to another
thread, with attribute access (``stats.pools["echo"].restarts``) and, for code written against
the earlier dict shape, key access and :meth:`~_Snapshot.to_dict`. Nothing here holds a secret:
settings, bridge-wide state and environment never appear in statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = ["CacheStatistics", "HostStatistics", "PoolStatistics", "WorkerStatistics"]


class _Snapshot:
    """Key access over a frozen dataclass's fields, giving the plain (dict and list) form:
    ``snap["pools"]["echo"]["workers"]`` is a list of dicts, ``snap.pools["echo"].workers``
    a tuple of :class:`WorkerStatistics`."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return _plain(getattr(self, key))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.keys() else default

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def items(self) -> Iterator[tuple[str, Any]]:
        return ((k, self[k]) for k in self.keys())

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-friendly copy (nested snapshots become dicts, tuples lists)."""
        return dict(self.items())


def _plain(value: Any) -> Any:
    if isinstance(value, _Snapshot):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class WorkerStatistics(_Snapshot):
    id: str
    pid: int | None
    busy: bool
    overflow: bool
    requests: int
    errors: int
    rss_bytes: int
    uptime: float
    resources: int
    node: str | None = None  # where it runs: this machine's hostname, or a Ray node
    backend: str = "local"


@dataclass(frozen=True, slots=True)
class CacheStatistics(_Snapshot):
    """A pool's result cache (``cache_ttl``): see :mod:`mlbridge._host.result_cache`."""

    enabled: bool = False
    entries: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    #: entries dropped to stay within cache_max_entries / cache_max_bytes
    evictions: int = 0
    #: entries dropped because their cache_ttl had passed
    expirations: int = 0
    max_entries: int = 0
    max_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PoolStatistics(_Snapshot):
    name: str
    state: str
    pool_size: int
    overflow: int
    workers: tuple[WorkerStatistics, ...]
    idle_workers: int
    waiting_callers: int
    requests: int
    errors: int
    #: workers that exited unexpectedly (crash, kill, missed heartbeat) and were replaced or
    #: are being replaced; recycling and retiring are not restarts
    restarts: int
    boot_error: str | None
    uptime: float
    backend: str = "local"
    bridge_state_keys: tuple[str, ...] = ()
    #: workers being started right now (not yet in ``workers``: they count once ready)
    starting_workers: int = 0
    cache: CacheStatistics = CacheStatistics()


@dataclass(frozen=True, slots=True)
class HostStatistics(_Snapshot):
    uptime: float
    default_bridge: str | None
    pools: Mapping[str, PoolStatistics]
    resources: int
    sessions: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "pools", MappingProxyType(dict(self.pools)))
