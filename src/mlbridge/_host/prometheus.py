"""The host's Prometheus exposition: :class:`HostCollector` over the :class:`.Telemetry` totals and
a statistics snapshot read at scrape time, through ``prometheus-client``.

Series: requests and seconds by (framework, command, success), a latency histogram by
(framework, command), errors by (framework, kind), checkout wait by framework, worker lifecycle
events; from the snapshot, workers by state, pool state, restarts, queue depth, RSS per worker
and, for pools with ``cache_ttl``, the result cache's counters and size. Labels are bounded as
:mod:`.telemetry` explains; never arguments, settings or secrets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .telemetry import Telemetry

__all__ = ["HostCollector", "prometheus_text"]


class HostCollector:
    """A ``prometheus-client`` collector over a :class:`Telemetry` and a statistics source.

    ``stats`` returns the host's statistics in their plain dict form (``to_dict()``); it is
    called once per scrape, on the scraping thread (the host's loop for ``Host.prometheus``).
    """

    def __init__(self, telemetry: Telemetry, stats: Callable[[], Mapping[str, Any]]) -> None:
        self.telemetry = telemetry
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        t = self.telemetry
        t.drain()  # calls are counted in batches (Telemetry.request): all of them, now
        yield from _request_families(t)
        fam = CounterMetricFamily(
            "mlbridge_errors",
            "Failed calls by framework and error kind (the error's stable code).",
            labels=["framework", "kind"],
        )
        for (fw, kind), n in sorted(t.errors.items()):
            fam.add_metric([fw, kind], n)
        yield fam
        hist = HistogramMetricFamily(
            "mlbridge_checkout_wait_seconds",
            "Time calls waited for a free worker, by framework.",
            labels=["framework"],
        )
        for fw, h in sorted(t.checkout_wait.items()):
            hist.add_metric([fw], h.cumulative(), h.total)
        yield hist
        fam = CounterMetricFamily(
            "mlbridge_worker_events", "Worker lifecycle events.", labels=["framework", "event"]
        )
        for (fw, ev), n in sorted(t.worker_events.items()):
            fam.add_metric([fw, ev], n)
        yield fam
        stats = self.stats()
        yield from _pool_families(stats)
        yield from _cache_families(stats)


def _request_families(t: Telemetry) -> Iterator[Metric]:
    labels = ["framework", "command", "success"]
    count = CounterMetricFamily(
        "mlbridge_requests",
        "Calls through the host, by framework, command, outcome.",
        labels=labels,
    )
    secs = CounterMetricFamily(
        "mlbridge_request_seconds", "Time spent in calls, by framework and command.", labels=labels
    )
    for (fw, cmd, ok), (n, s) in sorted(t.request_totals.items()):
        count.add_metric([fw, cmd, str(ok).lower()], int(n))
        secs.add_metric([fw, cmd, str(ok).lower()], s)
    hist = HistogramMetricFamily(
        "mlbridge_request_duration_seconds",
        "Latency of calls by framework and command (checkout wait included).",
        labels=["framework", "command"],
    )
    for (fw, cmd), h in sorted(t.latency.items()):
        hist.add_metric([fw, cmd], h.cumulative(), h.total)
    yield from (count, secs, hist)


def _pool_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    pools = sorted(stats.get("pools", {}).items())
    live = GaugeMetricFamily(
        "mlbridge_pool_workers", "Live workers per pool.", labels=["framework"]
    )
    by_state = GaugeMetricFamily(
        "mlbridge_workers",
        "Workers by framework and state (busy, idle: live; starting: booting).",
        labels=["framework", "state"],
    )
    pool_state = GaugeMetricFamily(
        "mlbridge_pool_state",
        "1 for each pool's current state (idle, starting, ready, broken, closed).",
        labels=["framework", "state"],
    )
    restarts = CounterMetricFamily(
        "mlbridge_restarts",
        "Workers that exited unexpectedly and were replaced, by framework.",
        labels=["framework"],
    )
    queue = GaugeMetricFamily(
        "mlbridge_queue_depth", "Callers waiting for a free worker.", labels=["framework"]
    )
    rss = GaugeMetricFamily(
        "mlbridge_worker_rss_bytes",
        "Resident memory of each worker (last heartbeat).",
        labels=["framework", "worker"],
    )
    for name, pool in pools:
        workers = pool["workers"]
        busy = sum(1 for w in workers if w["busy"])
        live.add_metric([name], len(workers))
        by_state.add_metric([name, "busy"], busy)
        by_state.add_metric([name, "idle"], len(workers) - busy)
        by_state.add_metric([name, "starting"], pool.get("starting_workers", 0))
        pool_state.add_metric([name, str(pool["state"])], 1)
        restarts.add_metric([name], pool["restarts"])
        queue.add_metric([name], pool["waiting_callers"])
        for w in workers:
            rss.add_metric([name, str(w["id"])], w["rss_bytes"])
    yield from (live, by_state, pool_state, restarts, queue, rss)


_CACHE_COUNTERS = (
    ("hits", "Calls answered from the result cache."),
    ("misses", "Cacheable calls that ran on a worker."),
    ("evictions", "Result-cache entries dropped to stay within the bounds."),
    ("expirations", "Result-cache entries dropped after their cache_ttl."),
)
_CACHE_GAUGES = (("entries", "Entries in the result cache."), ("bytes", "Bytes it holds."))


def _cache_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    """The result cache's counters and size, for pools that have it on (cache_ttl)."""
    pools = [
        (name, pool["cache"])
        for name, pool in sorted(stats.get("pools", {}).items())
        if isinstance(pool.get("cache"), Mapping) and pool["cache"].get("enabled")
    ]
    if not pools:
        return
    for key, text in _CACHE_COUNTERS:
        counter = CounterMetricFamily(f"mlbridge_cache_{key}", text, labels=["framework"])
        for name, cache in pools:
            counter.add_metric([name], cache[key])
        yield counter
    for key, text in _CACHE_GAUGES:
        gauge = GaugeMetricFamily(f"mlbridge_cache_{key}", text, labels=["framework"])
        for name, cache in pools:
            gauge.add_metric([name], cache[key])
        yield gauge


def prometheus_text(telemetry: Telemetry, stats: Mapping[str, Any]) -> str:
    """The Prometheus text exposition (version 0.0.4) of ``telemetry`` and ``stats``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(telemetry, lambda: stats))
    return generate_latest(registry).decode()
