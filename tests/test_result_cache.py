"""The host's result cache (``cache_ttl``): real echo workers, and the cache's own rules.

The echo bridge's ``count`` command is declared cacheable and returns how many ``count`` calls
its worker has run, so a hit that skipped the worker is visible in the value itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from host_helpers import config, echo_cfg
from mlbridge import AsyncMLBridge, BridgeOptions, MLBridge, errors
from mlbridge._host.result_cache import ResultCache, args_digest


def _bridge(**options: Any) -> MLBridge:
    return MLBridge(config(echo_cfg(**options)), env_overrides=False)


def _cache(b: MLBridge) -> Any:
    return b.statistics().pools["echo"].cache


@pytest.fixture(scope="module")
def cached() -> Iterator[MLBridge]:
    with _bridge(cache_ttl=60.0) as b:
        yield b


# ------------------------------------------------------------------ through real workers
def test_a_repeat_is_answered_without_the_worker(cached: MLBridge) -> None:
    before = _cache(cached)
    first = cached.execute("echo", "count", {"q": "hits-1"})
    again = cached.execute("echo", "count", {"q": "hits-1"})
    assert again == first  # the worker's counter did not move: it never saw the repeat
    other = cached.execute("echo", "count", {"q": "hits-2"})
    assert other["calls"] == first["calls"] + 1  # other arguments: a miss, run by the worker
    after = _cache(cached)
    assert after.enabled
    assert after.hits - before.hits == 1
    assert after.misses - before.misses == 2
    assert after.entries - before.entries == 2
    text = cached.prometheus()
    assert f'mlbridge_cache_hits_total{{framework="echo"}} {after.hits}' in text
    assert f'mlbridge_cache_entries{{framework="echo"}} {after.entries}' in text


def test_key_order_of_arguments_does_not_matter(cached: MLBridge) -> None:
    first = cached.execute("echo", "count", {"a": 1, "b": [1, 2], "c": {"x": 1, "y": 2}})
    again = cached.execute("echo", "count", {"c": {"y": 2, "x": 1}, "b": [1, 2], "a": 1})
    assert again == first
    # 1 and 1.0 and True are different arguments to a worker: different keys
    one = cached.execute("echo", "count", {"v": 1})
    one_float = cached.execute("echo", "count", {"v": 1.0})
    assert one_float["calls"] == one["calls"] + 1


def test_a_hit_is_a_fresh_copy_the_caller_may_change(cached: MLBridge) -> None:
    first = cached.execute("echo", "count", {"q": "copy"})
    first["args"]["q"] = "changed"
    again = cached.execute("echo", "count", {"q": "copy"})
    assert again["args"] == {"q": "copy"}
    assert again["calls"] == first["calls"]


def test_namespaced_commands_share_the_entry(cached: MLBridge) -> None:
    first = cached.execute("echo", "count", {"q": "ns"})
    assert cached.execute("echo", "echo:count", {"q": "ns"}) == first
    with pytest.raises(errors.MLBridgeError):  # another bridge's namespace: the worker refuses
        cached.execute("echo", "dspy:count", {"q": "ns"})


def test_cache_false_neither_reads_nor_writes(cached: MLBridge) -> None:
    first = cached.execute("echo", "count", {"q": "opt-out"})
    fresh = cached.execute("echo", "count", {"q": "opt-out"}, cache=False)
    assert fresh["calls"] > first["calls"]
    only_fresh = cached.execute("echo", "count", {"q": "opt-out-2"}, cache=False)
    nxt = cached.execute("echo", "count", {"q": "opt-out-2"})
    assert nxt["calls"] == only_fresh["calls"] + 1  # the cache=False result was not stored
    with pytest.raises(errors.InvalidArgumentError, match="cache must be True or False"):
        cached.execute("echo", "count", {}, cache="no")  # type: ignore[arg-type]


def test_failures_are_never_cached(cached: MLBridge) -> None:
    start = cached.execute("echo", "count", {"q": "before-failures"}, cache=False)["calls"]
    for _ in range(2):
        with pytest.raises(errors.MLBridgeError, match="count told to fail"):
            cached.execute("echo", "count", {"fail": "boom"})
    now = cached.execute("echo", "count", {"q": "after-failures"}, cache=False)["calls"]
    assert now == start + 3  # both failing calls ran on the worker


def test_streams_are_never_cached(cached: MLBridge) -> None:
    finals = []
    for _ in range(2):
        s = cached.stream("echo", "count", {"q": "streamed", "stream": 2})
        assert list(s) == [{"index": 0}, {"index": 1}]
        finals.append(s.result)
    assert finals[1]["calls"] == finals[0]["calls"] + 1
    # nor does a stream fill the cache for a plain call with the same arguments
    plain = cached.execute("echo", "count", {"q": "streamed", "stream": 2})
    assert plain["calls"] == finals[1]["calls"] + 1


def test_the_async_api_and_sessions_use_the_same_cache() -> None:
    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg(cache_ttl="1m")), env_overrides=False) as b:
            first = await b.execute("echo", "count", {"q": "async"})
            assert await b.execute("echo", "count", {"q": "async"}) == first
            async with b.session("echo") as s:
                assert await s.execute("count", {"q": "async"}) == first
                fresh = await s.execute("count", {"q": "async"}, cache=False)
                assert fresh["calls"] == first["calls"] + 1
            stats = b.statistics().pools["echo"].cache
            assert (stats.hits, stats.misses) == (2, 1)

    asyncio.run(main())


def test_entries_expire_after_cache_ttl() -> None:
    with _bridge(cache_ttl="300ms") as b:
        first = b.execute("echo", "count", {"q": "ttl"})
        assert b.execute("echo", "count", {"q": "ttl"}) == first
        time.sleep(0.5)
        later = b.execute("echo", "count", {"q": "ttl"})
        assert later["calls"] == first["calls"] + 1
        stats = _cache(b)
        assert (stats.hits, stats.misses, stats.expirations) == (1, 2, 1)


def test_entry_bound_evicts_the_least_recently_used() -> None:
    with _bridge(cache_ttl=60.0, cache_max_entries=2) as b:
        a1 = b.execute("echo", "count", {"k": "a"})
        b.execute("echo", "count", {"k": "b"})
        assert b.execute("echo", "count", {"k": "a"}) == a1  # a is now the most recent
        b.execute("echo", "count", {"k": "c"})  # evicts b
        assert b.execute("echo", "count", {"k": "a"}) == a1
        b_again = b.execute("echo", "count", {"k": "b"})
        assert b_again["calls"] == 4  # a, b, c, then b once more
        stats = _cache(b)
        assert stats.entries == 2
        assert stats.evictions == 2  # b (for c), then c or a (for b)


def test_byte_bound_keeps_results_within_cache_max_bytes() -> None:
    limit = 4000
    with _bridge(cache_ttl=60.0, cache_max_bytes=limit) as b:
        for i in range(6):
            b.execute("echo", "count", {"k": i, "pad": "x" * 900})
        stats = _cache(b)
        assert 0 < stats.bytes <= limit
        assert stats.entries < 6
        assert stats.evictions == 6 - stats.entries
        # a result larger than the whole bound is not stored (and evicts nothing)
        big = b.execute("echo", "count", {"pad": "y" * 5000})
        assert b.execute("echo", "count", {"pad": "y" * 5000})["calls"] == big["calls"] + 1
        assert _cache(b).evictions == stats.evictions


def test_only_declared_commands_are_cached_unless_named() -> None:
    with _bridge(cache_ttl={"*": 60.0, "echo": 60.0, "set_bridge_state": 60.0}) as b:

        def requests() -> int:
            return int(b.statistics().pools["echo"].requests)

        b.execute("echo", "text", {"n": 3})
        n = requests()
        b.execute("echo", "text", {"n": 3})  # not declared cacheable, not named: runs again
        assert requests() == n + 1
        b.execute("echo", "echo", {"v": 1})
        b.execute("echo", "echo", {"v": 1})  # named in cache_ttl: cached although undeclared
        assert requests() == n + 2
        # a reply that changed bridge-wide state is never cached, even when named
        b.execute("echo", "set_bridge_state", {"state": {"k": 1}})
        b.execute("echo", "set_bridge_state", {"state": {"k": 1}})
        assert requests() == n + 4


def test_new_bridge_wide_state_is_a_new_key() -> None:
    with _bridge(cache_ttl=60.0) as b:
        first = b.execute("echo", "count", {"q": "state"})
        assert b.execute("echo", "count", {"q": "state"}) == first
        b.execute("echo", "set_bridge_state", {"state": {"lm": "another"}})
        after = b.execute("echo", "count", {"q": "state"})
        assert after["calls"] == first["calls"] + 1  # computed afresh under the new state
        assert b.execute("echo", "count", {"q": "state"}) == after


def test_a_zero_entry_turns_one_command_off() -> None:
    with _bridge(cache_ttl={"*": 60.0, "count": 0}) as b:
        first = b.execute("echo", "count", {})
        assert b.execute("echo", "count", {})["calls"] == first["calls"] + 1
        assert _cache(b).hits == 0


def test_the_cache_is_off_by_default() -> None:
    with _bridge() as b:
        first = b.execute("echo", "count", {})
        assert b.execute("echo", "count", {})["calls"] == first["calls"] + 1
        stats = _cache(b)
        assert not stats.enabled
        assert (stats.hits, stats.misses) == (0, 0)
        assert "mlbridge_cache_" not in b.prometheus()


def test_workers_announce_their_cacheable_commands() -> None:
    with _bridge() as b:
        info = b.execute("echo", "get_info", {})
    assert "count" in info["cacheable"]
    assert "crash" not in info["cacheable"]


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1], "options.cache_ttl: must be a duration or a table"),
        ("soon", "options.cache_ttl: is not a duration"),
        ({"echo:count": 5}, "is not a command name"),
        ({"count": -1}, "options.cache_ttl.count: must be 0 or more"),
    ],
)
def test_bad_cache_ttl_is_a_config_error_naming_the_key(value: Any, message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        BridgeOptions(cache_ttl=value)


def test_cache_ttl_round_trips_through_a_mapping() -> None:
    opts = BridgeOptions.from_mapping(
        {"cache_ttl": {"embed": "10m", "*": 5}, "cache_max_entries": 10, "cache_max_bytes": "1MB"}
    )
    assert dict(opts.cache_ttl or {}) == {"embed": 600.0, "*": 5.0}
    assert (opts.cache_max_entries, opts.cache_max_bytes) == (10, 1_000_000)
    assert BridgeOptions.from_mapping(opts.to_mapping()) == opts
    assert dict(BridgeOptions(cache_ttl="2s").cache_ttl or {}) == {"*": 2.0}
    with pytest.raises(errors.ConfigError, match="cache_max_entries"):
        BridgeOptions(cache_max_entries=0)


# ------------------------------------------------------------------ the cache's own rules
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_args_digest_is_canonical() -> None:
    same = args_digest({"b": {"d": 3, "c": 2}, "a": 1})
    assert args_digest({"a": 1, "b": {"c": 2, "d": 3}}) == same
    assert args_digest({"a": 1}) != args_digest({"a": True})
    assert args_digest({"a": [1, 2]}) != args_digest({"a": [[1, 2]]})
    assert args_digest({"a": b"x"}) != args_digest({"a": "x"})
    assert args_digest({"a": object()}) is None  # not encodable: not cached


def test_expiry_and_lru_with_a_clock() -> None:
    clock = _Clock()
    c = ResultCache({"*": 10.0}, max_entries=2, max_bytes=10**6, clock=clock)
    c.learn({"cacheable": ["f"], "bridge": "b"})
    assert c.ttl_for("f") == 10.0
    assert c.ttl_for("b:f") == 10.0
    assert c.ttl_for("other:f") is None
    assert c.ttl_for("g") is None  # not declared
    k1, k2, k3 = (c.key("f", {"i": i}) for i in range(3))
    assert k1 and k2 and k3
    c.put(k1, {"v": 1})
    c.put(k2, {"v": 2})
    assert c.get(k1) == (True, {"v": 1})
    c.put(k3, {"v": 3})  # evicts k2, the least recently used
    assert c.get(k2) == (False, None)
    clock.now = 10.0
    assert c.get(k1) == (False, None)  # expired at exactly its TTL
    s = c.statistics()
    assert (s.hits, s.misses, s.evictions, s.expirations, s.entries) == (1, 2, 1, 1, 1)
