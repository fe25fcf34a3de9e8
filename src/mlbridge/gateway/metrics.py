"""``/metrics``: the host's and the gateway's metrics in the Prometheus text format.

:func:`install_metrics` gives an app its own ``prometheus-client`` registry holding

* the host's collector (:class:`mlbridge._host.telemetry.HostCollector`): calls and latency
  histograms by framework and command, errors by kind, checkout wait, worker events, workers by
  state, restarts, RSS per worker, queue depth, pool state; read from the host at scrape time;
* the gateway's own HTTP series, kept by a small ASGI middleware:
  ``mlbridge_http_requests_total{method, route, status}`` and
  ``mlbridge_http_request_duration_seconds{method, route}``.

Labels stay bounded: ``route`` is the matched route's template (``/v1/resources/{id}``, never the
path a client sent), ``<unmatched>`` for anything else; ``method`` is one of the HTTP methods
or ``OTHER``. It also installs :mod:`.tracing` (spans when ``opentelemetry-sdk`` is present).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from .._host.prometheus import HostCollector
from .._host.telemetry import LATENCY_BUCKETS
from . import tracing

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from .._api import AsyncMLBridge

__all__ = ["METRICS_PATH", "GatewayMetrics", "install_metrics"]

METRICS_PATH = "/metrics"
UNMATCHED = "<unmatched>"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class GatewayMetrics:
    """The registry behind one app's ``/metrics`` and its HTTP series."""

    def __init__(self, bridge: AsyncMLBridge) -> None:
        host = bridge._host
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HostCollector(host.telemetry, lambda: host.statistics().to_dict()))
        self.http_requests = Counter(
            "mlbridge_http_requests",
            "HTTP requests to the gateway, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "mlbridge_http_request_duration_seconds",
            "Gateway request latency (to the end of the response body), by method and route.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _MetricsMiddleware:
    """Count every HTTP request by method, matched route template and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, root: Starlette) -> None:
        self.app = app
        self.metrics = metrics
        self.root = root

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            method = scope.get("method", "GET")
            method = method if method in _METHODS else "OTHER"
            route = self.route_of(scope)
            self.metrics.http_requests.labels(method, route, str(status[0])).inc()
            self.metrics.http_seconds.labels(method, route).observe(time.perf_counter() - t0)

    def route_of(self, scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        probe = {**scope, "type": "http"}
        for candidate in self.root.router.routes:
            match, _ = candidate.matches(probe)
            if match == Match.FULL:
                return str(getattr(candidate, "path", UNMATCHED))
        return UNMATCHED


def install_metrics(app: Starlette, bridge: AsyncMLBridge) -> GatewayMetrics:
    """Serve ``GET /metrics`` from ``bridge``'s host and this app's HTTP series, and trace
    requests and bridge calls when OpenTelemetry is installed (:func:`.tracing.install_tracing`).
    Call it before the app starts (it adds middleware)."""
    metrics = GatewayMetrics(bridge)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    app.add_route(METRICS_PATH, metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_middleware(_MetricsMiddleware, metrics=metrics, root=app)
    tracing.install_tracing(app)
    app.state.mlbridge_metrics = metrics
    return metrics
