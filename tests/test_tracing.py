"""OpenTelemetry spans for gateway requests and bridge calls (in-memory exporter), with the trace
context carried on the wire into the worker (echo's ``trace_context`` command returns what the
worker received)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway_helpers import serving
from host_helpers import config, echo_cfg
from mlbridge import errors
from mlbridge._api import AsyncMLBridge, MLBridge
from mlbridge._host.tracecontext import set_call_tracer
from mlbridge._protocol.messages import parse_request, request_wire
from mlbridge.gateway.tracing import disable_call_spans, enable_call_spans, install_tracing
from obs_helpers import serve

pytestmark = [pytest.mark.gateway, pytest.mark.timeout(300)]

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    yield exp
    set_call_tracer(None)  # the call tracer is process-wide: leave none for other tests
    exp.shutdown()


def _app(bridge: AsyncMLBridge, exporter: InMemorySpanExporter) -> FastAPI:
    app = FastAPI()

    @app.get("/trace")
    async def trace_route() -> Any:
        return {"context": await bridge.execute("echo", "trace_context")}

    @app.get("/fail")
    async def fail_route() -> Any:
        try:
            await bridge.execute("echo", "fail", {"type": "KeyError"})
        except errors.MLBridgeError as exc:
            return {"error": exc.code}
        raise AssertionError("echo:fail succeeded")

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert install_tracing(app, tracer_provider=provider) is True
    return app


async def _run(exporter: InMemorySpanExporter, path: str, **headers: str) -> Any:
    async with AsyncMLBridge(config(echo_cfg())) as b:
        async with serve(_app(b, exporter)) as url, httpx.AsyncClient(base_url=url) as c:
            r = await c.get(path, headers=headers)
            assert r.status_code == 200, r.text
            return r.json()


def _by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == kind]


def _hex(n: int, width: int) -> str:
    return format(n, f"0{width}x")


def test_request_and_call_spans_nest_and_the_worker_gets_the_trace_id(
    exporter: InMemorySpanExporter,
) -> None:
    reply = asyncio.run(_run(exporter, "/trace"))
    spans = exporter.get_finished_spans()
    (server,) = _by_kind(spans, SpanKind.SERVER)
    (call,) = _by_kind(spans, SpanKind.CLIENT)
    assert server.name == "GET /trace"
    assert server.attributes is not None and server.attributes["http.route"] == "/trace"
    assert server.attributes["http.response.status_code"] == 200
    assert call.name == "mlbridge.call echo:trace_context"
    assert call.attributes is not None and call.attributes["mlbridge.bridge"] == "echo"
    assert str(call.attributes["mlbridge.worker_id"]).startswith("echo-")
    # The call span is a child of the request's span, in the same trace.
    assert call.parent is not None and server.context is not None and call.context is not None
    assert call.parent.span_id == server.context.span_id
    assert call.context.trace_id == server.context.trace_id
    assert server.parent is None
    # The worker received the call span's context: same trace id, the call span as parent.
    version, trace_id, parent_id, flags = reply["context"]["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    assert trace_id == _hex(server.context.trace_id, 32)
    assert parent_id == _hex(call.context.span_id, 16)


def test_a_client_traceparent_is_continued_down_to_the_worker(
    exporter: InMemorySpanExporter,
) -> None:
    header = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
    state = "congo=t61rcWkgMzE"
    reply = asyncio.run(_run(exporter, "/trace", traceparent=header, tracestate=state))
    (server,) = _by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert server.context is not None and server.parent is not None
    assert _hex(server.context.trace_id, 32) == CLIENT_TRACE
    assert _hex(server.parent.span_id, 16) == CLIENT_PARENT
    assert reply["context"]["traceparent"].split("-")[1] == CLIENT_TRACE
    assert reply["context"]["tracestate"] == state


def test_a_failed_call_has_an_error_span_with_its_code(exporter: InMemorySpanExporter) -> None:
    assert asyncio.run(_run(exporter, "/fail")) == {"error": "unknown"}
    (call,) = _by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)
    assert call.status.status_code == StatusCode.ERROR
    assert call.attributes is not None and call.attributes["mlbridge.error_code"] == "unknown"


def test_untraced_calls_carry_no_context() -> None:
    set_call_tracer(None)

    async def main() -> Any:
        async with AsyncMLBridge(config(echo_cfg())) as b:
            return await b.execute("echo", "trace_context")

    assert asyncio.run(main()) is None
    assert "context" not in request_wire(1, "echo", {}, False, None)


class _BrokenSpan:
    wire: ClassVar[dict[str, str]] = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"}

    def end(self, *, ok: bool, error_code: str | None, worker_id: str | None) -> None:
        raise RuntimeError("exporter exploded")


class _BrokenTracer:
    def start(self, framework: str, command: str, session_id: str | None) -> _BrokenSpan:
        return _BrokenSpan()


def test_a_tracer_that_fails_never_fails_the_call(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> Any:
        async with AsyncMLBridge(config(echo_cfg())) as b:
            return await b.execute("echo", "trace_context")

    set_call_tracer(_BrokenTracer())
    try:
        with caplog.at_level(logging.ERROR, logger="mlbridge.host"):
            got = asyncio.run(main())
    finally:
        set_call_tracer(None)
    assert got == _BrokenSpan.wire
    assert "ending the call's trace span failed" in caplog.text


def test_a_malformed_wire_context_is_dropped_not_fatal() -> None:
    base = {"id": 3, "command": "echo", "args": {}}
    assert parse_request({**base, "context": ["traceparent"]}).context is None
    assert parse_request({**base, "context": {"traceparent": 7}}).context is None
    ok = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01", "junk": 1}
    assert parse_request({**base, "context": ok}).context == {"traceparent": ok["traceparent"]}


_NO_TRACING = (
    "from starlette.applications import Starlette\n"
    "from mlbridge.gateway.tracing import install_tracing, otel_available\n"
    "from mlbridge._host.tracecontext import call_tracer\n"
    "app = Starlette()\n"
    "assert otel_available() is {available} and install_tracing(app) is False\n"
    "assert call_tracer() is None and not app.user_middleware\n"
    "print('ok')\n"
)


@pytest.mark.parametrize(
    ("prelude", "available"),
    [
        pytest.param("import sys; sys.modules['opentelemetry'] = None\n", False, id="no-otel"),
        pytest.param("", True, id="no-provider"),
    ],
)
def test_without_opentelemetry_or_a_provider_install_tracing_does_nothing(
    prelude: str, available: bool
) -> None:
    code = prelude + _NO_TRACING.format(available=available)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_mlbridge_serve_traces_with_otel_traces_exporter_console(tmp_path: Path) -> None:
    """A real ``mlbridge serve``: spans printed on stderr (the console exporter), the client's
    trace continued, and the worker received that trace id."""
    header = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "mlbridge-test"}
    with serving(tmp_path, "[bridges.echo]\npool_size = 1\n", env=env) as gw, gw.client() as c:
        r = c.post(
            "/api/frameworks/echo/execute",
            json={"command": "trace_context"},
            headers={"traceparent": header},
        )
        assert r.status_code == 200, r.text
        got = r.json()["result"]["traceparent"]
    assert got.split("-")[1] == CLIENT_TRACE
    spans = gw.stderr()
    assert '"name": "mlbridge.call echo:trace_context"' in spans, spans[-3000:]
    assert '"name": "POST /api/frameworks/{framework}/execute"' in spans
    assert f'"trace_id": "0x{CLIENT_TRACE}"' in spans
    assert f'"span_id": "0x{got.split("-")[2]}"' in spans  # the worker's parent: the call span
    assert '"service.name": "mlbridge-test"' in spans


def test_an_unknown_otel_traces_exporter_is_logged_and_nothing_installed() -> None:
    code = "import logging; logging.basicConfig(level=logging.WARNING)\n" + _NO_TRACING.format(
        available=True
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_TRACES_EXPORTER"] = "carrier-pigeon"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert "OTEL_TRACES_EXPORTER='carrier-pigeon' is not one mlbridge configures" in out.stderr


def test_blocking_api_calls_are_traced_while_a_tracer_is_installed(
    exporter: InMemorySpanExporter,
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert enable_call_spans(provider) is True
    with MLBridge(config(echo_cfg())) as b:
        for _ in range(3):  # the caller-thread fast path would skip the span: it is not taken
            got = b.execute("echo", "trace_context")
            assert got is not None and got["traceparent"].startswith("00-")
        disable_call_spans()
        assert b.execute("echo", "trace_context") is None
    calls = _by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)
    assert [s.name for s in calls] == ["mlbridge.call echo:trace_context"] * 3


def test_a_call_back_through_the_host_continues_the_worker_calls_trace(
    exporter: InMemorySpanExporter,
) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert enable_call_spans(provider) is True

    async def main() -> Any:
        async with AsyncMLBridge(config(echo_cfg(), echo_cfg("inner"))) as b:
            # echo's call_host calls 'inner' through the host (a call-back from the worker).
            args = {"bridge": "inner", "command": "trace_context"}
            return await b.execute("echo", "call_host", args)

    inner_seen = asyncio.run(main())
    spans = {s.name: s for s in _by_kind(exporter.get_finished_spans(), SpanKind.CLIENT)}
    outer, inner = spans["mlbridge.call echo:call_host"], spans["mlbridge.call inner:trace_context"]
    assert outer.context is not None and inner.context is not None and inner.parent is not None
    assert inner.parent.span_id == outer.context.span_id
    assert inner.context.trace_id == outer.context.trace_id
    # ... and the inner worker got the inner call's span as its parent, in the same trace.
    _, trace_id, parent_id, _ = inner_seen["traceparent"].split("-")
    assert trace_id == _hex(outer.context.trace_id, 32)
    assert parent_id == _hex(inner.context.span_id, 16)
