"""The host's side of shared-memory payloads (:mod:`mlbridge._shm`): names and leftovers.

Every name this host (and its workers) writes starts with ``mlbridge-<pid>-<start ticks>-``, its
identity as :mod:`.procfs` reads it, then ``c<n>-`` for one worker channel (its pooled
segments add ``p<n>-``; the worker's own start ``c<n>-w<pid>-``). At start the host
removes the segments of hosts that are gone (:func:`sweep_leftovers`), the way the reaper
removes their workers; a live host's segments are never touched.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from .._shm import ShmOffload, host_prefix, shm_available, sweep_dead_hosts
from .procfs import alive_since, proc_stat

__all__ = [
    "ShmOffload",
    "accepted",
    "channel_prefix",
    "offer",
    "shm_available",
    "sweep_leftovers",
]

_channels = itertools.count(1)
_identity: tuple[int, str] | None = None


def _host_prefix() -> str:
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:  # (recomputed in a forked child)
        st = proc_stat(pid)
        _identity = (pid, host_prefix(pid, st.start if st is not None else 0))
    return _identity[1]


def channel_prefix() -> str:
    """A fresh prefix for one worker channel's segments."""
    return f"{_host_prefix()}c{next(_channels)}-"


def sweep_leftovers() -> int:
    """Remove the segments of hosts that died (SIGKILL leaves them behind)."""
    return sweep_dead_hosts(alive_since)


def offer(threshold: int, pool_bytes: int = 0) -> dict[str, Any] | None:
    """The ``shm`` argument of a channel's ``hello`` (None: not offered: off, or no /dev/shm).
    ``pool_bytes`` bounds each side's pool of reused segments (0: one-shot files only)."""
    if threshold <= 0 or not shm_available():
        return None
    return {"prefix": channel_prefix(), "threshold": threshold, "pool_bytes": pool_bytes}


def accepted(offered: dict[str, Any] | None, reply: dict[str, Any]) -> ShmOffload | None:
    """The channel's shared-memory side once the worker's ``hello`` reply took the offer."""
    if offered is None or reply.get("shm") is not True or reply.get("codec") != "msgpack":
        return None
    prefix = offered["prefix"]
    pool = offered["pool_bytes"] if reply.get("shm_pool") is True else 0
    return ShmOffload(prefix, f"{prefix}w{reply.get('pid')}-", offered["threshold"], pool)
