"""OpenTelemetry spans for gateway requests and bridge calls, with the context sent to workers.

When ``opentelemetry-api`` is importable (the ``otel`` extra brings it with the SDK),
:func:`install_tracing` adds an ASGI middleware that opens a SERVER span per HTTP request
(``"GET /v1/models"``: method and route template), continuing the client's trace when the
request carries a W3C ``traceparent`` header, and installs a host call tracer
(:func:`mlbridge._host.tracecontext.set_call_tracer`): every bridge call then gets a CLIENT span
``"mlbridge.call <bridge>:<command>"`` as a child of the current span (the request's, inside the
gateway), and the call span's ``traceparent`` travels on the request to the worker, where the
bridge reads it as ``self.call.trace_context``.

Spans go to the ``TracerProvider`` given, else the process's global one: set it before the app
is built (``trace.set_tracer_provider(TracerProvider(...))`` with ``opentelemetry-sdk``, or run
under ``opentelemetry-instrument``). With none set, the standard ``OTEL_TRACES_EXPORTER``
variable configures one (:func:`configure_from_env`): ``console`` prints finished spans as JSON
on stderr, ``otlp`` exports them (needs ``opentelemetry-exporter-otlp``); ``OTEL_SERVICE_NAME``
names the service (default ``mlbridge``). With no provider at all, or without OpenTelemetry
installed, nothing is installed: no middleware, no call spans, no context on the wire, no cost.

Span attributes hold no secrets: method, route template, status, bridge, command, worker id and
error code; never headers, arguments or results.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from .._host.tracecontext import parent_context, set_call_tracer

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = [
    "configure_from_env",
    "disable_call_spans",
    "enable_call_spans",
    "install_tracing",
    "otel_available",
]

log = logging.getLogger("mlbridge.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TRACER_NAME = "mlbridge"


def otel_available() -> bool:
    try:
        import opentelemetry.propagate
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


def configure_from_env() -> bool:
    """Set a global SDK ``TracerProvider`` from ``OTEL_TRACES_EXPORTER`` (``console`` or
    ``otlp``) when none is set yet; True when one was set. An unusable value is logged."""
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if kind in ("", "none"):
        return False
    from opentelemetry import trace

    if _recording(trace.get_tracer_provider()):
        return False  # the process configured its own
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        log.warning(
            "OTEL_TRACES_EXPORTER=%s but opentelemetry-sdk is not installed: no spans "
            "(pip install 'mlbridge[otel]')",
            kind,
        )
        return False
    if kind == "console":
        processor: Any = SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr))
    elif kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-proto-http: no spans"
            )
            return False
        processor = BatchSpanProcessor(OTLPSpanExporter())
    else:
        log.warning(
            "OTEL_TRACES_EXPORTER=%r is not one mlbridge configures (console, otlp): no spans; "
            "configure a TracerProvider yourself or use one of those",
            kind,
        )
        return False
    service = os.environ.get("OTEL_SERVICE_NAME") or "mlbridge"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return True


def _recording(provider: Any) -> bool:
    """False for the API's placeholders (nothing configured): spans would be no-ops."""
    from opentelemetry import trace

    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def _tracer(tracer_provider: Any | None) -> Any:
    from opentelemetry import trace

    return trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)


class _CallSpan:
    __slots__ = ("span", "wire")

    def __init__(self, span: Any, wire: dict[str, str] | None) -> None:
        self.span = span
        self.wire = wire

    def end(self, *, ok: bool, error_code: str | None, worker_id: str | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self.span
        if worker_id is not None:
            span.set_attribute("mlbridge.worker_id", worker_id)
        if not ok:
            span.set_attribute("mlbridge.error_code", error_code or "unknown")
            span.set_status(Status(StatusCode.ERROR, error_code or "unknown"))
        span.end()


class _OtelCallTracer:
    """The host's call tracer (:class:`mlbridge._host.tracecontext.CallTracer`) on OpenTelemetry."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import propagate, trace

        self.tracer = tracer
        self._client = trace.SpanKind.CLIENT
        self._extract = propagate.extract

    def start(self, framework: str, command: str, session_id: str | None) -> _CallSpan:
        attrs = {"mlbridge.bridge": framework, "mlbridge.command": command}
        if session_id is not None:
            attrs["mlbridge.session_id"] = session_id
        # A call-back continues the trace of the worker call that made it.
        wire_parent = parent_context.get()
        parent = self._extract(wire_parent) if wire_parent is not None else None
        span = self.tracer.start_span(
            f"mlbridge.call {framework}:{command}",
            context=parent,
            kind=self._client,
            attributes=attrs,
        )
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return _CallSpan(span, None)
        # W3C Trace Context, written directly (what the tracecontext propagator writes, at a
        # quarter of its cost on the call path).
        wire = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
        if ctx.trace_state:
            wire["tracestate"] = ctx.trace_state.to_header()
        return _CallSpan(span, wire)


def enable_call_spans(tracer_provider: Any | None = None) -> bool:
    """Trace every bridge call of this process's hosts (see the module docstring); False
    (and nothing done) when OpenTelemetry is not installed."""
    if not otel_available():
        return False
    set_call_tracer(_OtelCallTracer(_tracer(tracer_provider)))
    return True


def disable_call_spans() -> None:
    set_call_tracer(None)


class _TracingMiddleware:
    """A SERVER span per HTTP request, current while the app handles it."""

    def __init__(self, app: ASGIApp, tracer: Any) -> None:
        from opentelemetry import context, propagate, trace

        self.app = app
        self.tracer = tracer
        self._extract = propagate.extract
        self._attach = context.attach
        self._detach = context.detach
        self._set_span = trace.set_span_in_context
        self._server = trace.SpanKind.SERVER
        self._status = (trace.Status, trace.StatusCode.ERROR)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", "GET"))
        carrier = {
            k.decode("latin-1").lower(): v.decode("latin-1")
            for k, v in scope.get("headers", ())
            if k.lower() in (b"traceparent", b"tracestate")
        }
        parent = self._extract(carrier) if carrier else None
        span = self.tracer.start_span(
            method,
            context=parent,
            kind=self._server,
            attributes={"http.request.method": method, "url.path": str(scope.get("path", ""))},
        )
        token = self._attach(self._set_span(span, parent))
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if isinstance(route, str):
                span.set_attribute("http.route", route)
                span.update_name(f"{method} {route}")
            span.set_attribute("http.response.status_code", status[0])
            if status[0] >= 500:
                status_cls, error = self._status
                span.set_status(status_cls(error))
            span.end()
            self._detach(token)


def install_tracing(app: Starlette, tracer_provider: Any | None = None) -> bool:
    """Trace ``app``'s requests and this process's bridge calls with OpenTelemetry (the global
    ``TracerProvider`` unless one is given; see the module docstring). Returns False, doing
    nothing, when OpenTelemetry is not installed or no provider is configured."""
    if not otel_available():
        log.debug("opentelemetry is not installed: no spans (install mlbridge[otel])")
        return False
    if tracer_provider is None:
        from opentelemetry import trace

        configure_from_env()
        if not _recording(trace.get_tracer_provider()):
            log.debug("no OpenTelemetry TracerProvider configured: no spans")
            return False
    tracer = _tracer(tracer_provider)
    app.add_middleware(_TracingMiddleware, tracer=tracer)
    set_call_tracer(_OtelCallTracer(tracer))
    return True
