"""The pool's policy as pure functions, without processes."""

from __future__ import annotations

from mlbridge._host import policy
from mlbridge._host.policy import PoolCounts, WorkerFacts
from mlbridge.config import BridgeOptions


def facts(requests: int = 0, age: float = 0.0, rss: int = 0, **kw: object) -> WorkerFacts:
    return WorkerFacts(requests, age, rss, **kw)  # type: ignore[arg-type]


def test_recycle_by_requests_age_and_memory_in_that_order() -> None:
    opts = BridgeOptions(max_requests=10, max_age=60.0, max_memory=100_000_000)
    assert policy.recycle_reason(facts(9, 59, 99_000_000), opts) is None
    assert policy.recycle_reason(facts(10), opts) == "served max_requests=10"
    assert policy.recycle_reason(facts(1, 60), opts) == "older than max_age=60s"
    assert policy.recycle_reason(facts(1, 1, 150_000_000), opts) == (
        "RSS 150 MB over max_memory=100MB"
    )
    assert policy.recycle_reason(facts(10**9, 10**9, 10**12), BridgeOptions()) is None


def test_growth_core_then_overflow_then_full() -> None:
    assert policy.growth(PoolCounts(0, 0, 0, 2, 1)) == "core"
    assert policy.growth(PoolCounts(1, 1, 0, 2, 1)) == "core"
    assert policy.growth(PoolCounts(2, 2, 0, 2, 1)) == "overflow"
    assert policy.growth(PoolCounts(2, 2, 1, 2, 1)) is None  # one is starting: full
    assert policy.growth(PoolCounts(3, 2, 0, 2, 1)) is None
    assert policy.growth(PoolCounts(1, 1, 0, 0, 0)) is None  # pool_size 0 means 1


def test_missing_core_counts_starting_workers() -> None:
    assert policy.missing_core(PoolCounts(1, 1, 0, 3, 0)) == 2
    assert policy.missing_core(PoolCounts(1, 1, 2, 3, 0)) == 0
    assert policy.missing_core(PoolCounts(4, 3, 0, 3, 2)) == 0


def test_boot_verdict_and_restart_delay() -> None:
    assert not policy.boot_verdict(2, 3, definitive=False)
    assert policy.boot_verdict(3, 3, definitive=False)
    assert policy.boot_verdict(2, 5, definitive=True)  # a named boot failure: twice is enough
    assert not policy.boot_verdict(1, 5, definitive=True)
    assert policy.restart_delay(0, 0, 0.5) == 0.0
    assert policy.restart_delay(1, 0, 0.5) == 0.5
    assert policy.restart_delay(0, 2, 0.5) == 0.5


def test_idle_overflow_retires_after_idle_timeout_core_never() -> None:
    opts = BridgeOptions(idle_timeout=30.0)
    assert policy.retire_idle_overflow(facts(overflow=True, idle_for=29.0), opts) is None
    assert policy.retire_idle_overflow(facts(overflow=True, idle_for=30.0), opts) == (
        "idle overflow worker for 30s"
    )
    assert policy.retire_idle_overflow(facts(overflow=False, idle_for=1e9), opts) is None
    assert policy.overflow_on_arrival(2, 2) and not policy.overflow_on_arrival(1, 2)


def test_sizes_are_quoted_as_people_write_them() -> None:
    from mlbridge._units import format_size

    assert [format_size(n) for n in (2 * 10**9, 256 * 1024**2, 150 * 10**6, 2 * 1024**3)] == [
        "2GB",
        "256MiB",
        "150MB",
        "2GiB",
    ]
    assert format_size(1_500_001) == "1.5MB (1500001 bytes)" and format_size(999) == "999B"
