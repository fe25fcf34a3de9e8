"""The host's result cache: repeats of a cacheable command are answered without a worker.

Theory of operation
-------------------
One :class:`ResultCache` per pool (so it goes when the pool is replaced by a config update).
A command is cached when ``cache_ttl`` (see :mod:`mlbridge._config_perf`) gives it a duration
over 0: by name, or through ``"*"`` when the bridge declares it cacheable (the ``cacheable``
list of its workers' ``hello`` reply, learnt by :meth:`ResultCache.learn` when a worker is
ready). A command sent with another bridge's namespace is never cached (the worker would refuse it).

The key is ``(command, sha256 of the arguments and of the pool's bridge-wide state version)``
(so a result computed before, say, a new LM was configured is never served after), the
arguments encoded in a canonical form (MessagePack with every map's keys sorted; it tells ``1``
from ``1.0`` and ``True``): arguments that cannot be encoded are simply not cached. A value is
stored *encoded* (MessagePack), so each hit decodes a fresh copy that the caller may mutate, and
the byte bound counts real bytes. Bounds: ``cache_max_entries``
and ``cache_max_bytes``, least recently used first out (``evictions``); an entry past its TTL is
dropped when met (``expirations``). Only successes are stored: a failure, a stream, a reply that
set bridge-wide or resource state, or a call made with ``cache=False`` never is.

Threads: the loop thread (``Host.execute``) and caller threads (the blocking API's direct path)
both use it; every access to the entries and counters holds ``_lock``, and encoding and decoding
run outside it.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .._config_perf import ALL_COMMANDS
from .._protocol.codec import MsgpackCodec
from ..errors import MLBridgeError
from .stats import CacheStatistics

if TYPE_CHECKING:
    from ..config import BridgeOptions

__all__ = ["CacheKey", "ResultCache"]

CacheKey = tuple[str, bytes]
_CODEC: Final = MsgpackCodec()
_LEN: Final = struct.Struct(">Q")
# Per-entry bookkeeping counted against cache_max_bytes beside the encoded value.
_ENTRY_OVERHEAD: Final = 128


@dataclass(slots=True)
class _Entry:
    blob: bytes
    expires_at: float
    size: int


_CONTAINERS: Final = (dict, list, tuple)


def _key_order(key: Any) -> tuple[str, Any]:
    return (type(key).__name__, key if isinstance(key, str | int | float) else repr(key))


def _sorted(obj: Any) -> Any:
    """``obj`` with every map's keys in one order (MessagePack keeps insertion order), so equal
    arguments encode to equal bytes; containers without maps inside are returned as they are."""
    t = type(obj)
    if t is dict:
        return {k: _sorted(obj[k]) for k in sorted(obj, key=_key_order)}
    if (t is list or t is tuple) and any(type(v) in _CONTAINERS for v in obj):
        return [_sorted(v) for v in obj]
    return obj


def args_digest(args: Any, state_version: int = 0) -> bytes | None:
    """sha256 of the canonical encoding of ``args`` (maps sorted by key; MessagePack tells
    ``1`` from ``1.0`` and ``True``, a map from a list of pairs) and of the bridge-wide state's
    version; None when they cannot be encoded."""
    try:
        data = _CODEC.encode(_sorted(args))
    except (MLBridgeError, RecursionError, TypeError):
        return None
    h = hashlib.sha256(_LEN.pack(state_version))
    h.update(data)
    return h.digest()


class ResultCache:
    """Bounded, TTL'd results of cacheable commands for one pool (see the module docstring)."""

    def __init__(
        self,
        ttl: Mapping[str, float] | None,
        *,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = {k: v for k, v in (ttl or {}).items() if v > 0}
        self._off = {k for k, v in (ttl or {}).items() if v <= 0}
        self.enabled = bool(self._ttl)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._bytes = 0
        self.declared: frozenset[str] = frozenset()
        self.bridge_name: str | None = None
        self.hits = self.misses = self.evictions = self.expirations = 0

    @classmethod
    def for_options(cls, opts: BridgeOptions) -> ResultCache:
        ttl = opts.cache_ttl
        assert ttl is None or isinstance(ttl, Mapping)  # validated into a mapping
        return cls(ttl, max_entries=opts.cache_max_entries, max_bytes=opts.cache_max_bytes)

    def learn(self, hello: Mapping[str, Any]) -> None:
        """A worker is ready: note which commands its bridge declares cacheable."""
        names = hello.get("cacheable")
        if isinstance(names, list):
            self.declared = frozenset(n for n in names if isinstance(n, str))
        name = hello.get("bridge")
        if isinstance(name, str):
            self.bridge_name = name

    # ------------------------------------------------------------------ lookups
    def ttl_for(self, command: str) -> float | None:
        """The TTL ``command`` is cached for, or None when it is not cached."""
        if not self.enabled:
            return None
        namespace, _, base = command.rpartition(":")
        if namespace and namespace != "common" and namespace != self.bridge_name:
            return None
        if base in self._ttl:
            return self._ttl[base]
        if base in self._off or base not in self.declared:
            return None
        return self._ttl.get(ALL_COMMANDS)

    def key(self, command: str, args: Any, state_version: int = 0) -> CacheKey | None:
        """The cache key of a call, or None when it is not cached (command or arguments).
        ``state_version``: the pool's bridge-wide state version (a new LM, say, is a new key)."""
        if self.ttl_for(command) is None:
            return None
        digest = args_digest(args, state_version)
        return None if digest is None else (command.rpartition(":")[2], digest)

    def get(self, key: CacheKey, *, count_miss: bool = True) -> tuple[bool, Any]:
        """``(True, a fresh copy of the value)`` on a hit, else ``(False, None)``."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires_at <= now:
                self._drop(key, entry)
                self.expirations += 1
                entry = None
            if entry is None:
                if count_miss:
                    self.misses += 1
                return False, None
            self._entries.move_to_end(key)
            self.hits += 1
            blob = entry.blob
        return True, _CODEC.decode(blob)

    def keep(self, key: CacheKey | None, reply: Mapping[str, Any], value: Any) -> None:
        """After a call: store its result when it succeeded and changed no host-side state."""
        if (
            key is not None
            and reply.get("success") is True
            and "bridge_state" not in reply
            and "resource_states" not in reply
        ):
            self.put(key, value)

    def count_miss(self) -> None:
        with self._lock:
            self.misses += 1

    def put(self, key: CacheKey, value: Any) -> None:
        """Store a successful result (a value that cannot be encoded is not stored)."""
        ttl = self._ttl.get(key[0]) or (
            self._ttl.get(ALL_COMMANDS) if key[0] in self.declared else None
        )
        if ttl is None:
            return
        try:
            blob = _CODEC.encode(value)
        except MLBridgeError:
            return
        size = len(blob) + len(key[1]) + len(key[0]) + _ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                self._drop(key, old)
            self._entries[key] = _Entry(blob, self._clock() + ttl, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                oldest, entry = next(iter(self._entries.items()))
                self._drop(oldest, entry)
                self.evictions += 1

    def _drop(self, key: CacheKey, entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= entry.size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def statistics(self) -> CacheStatistics:
        with self._lock:
            return CacheStatistics(
                enabled=self.enabled,
                entries=len(self._entries),
                bytes=self._bytes,
                hits=self.hits,
                misses=self.misses,
                evictions=self.evictions,
                expirations=self.expirations,
                max_entries=self.max_entries,
                max_bytes=self.max_bytes,
            )
