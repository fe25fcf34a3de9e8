"""Tracing seam of the host: a span per call when a tracer is installed, its context on the wire.

The host never imports OpenTelemetry. :mod:`mlbridge.gateway.tracing` (or any code) installs a
:class:`CallTracer` with :func:`set_call_tracer`; from then on every call through the host's one
call path (:class:`~.callpath.Call`: execute, stream, resource calls, call-backs) opens a
:class:`CallSpan` before it checks a worker out and ends it when the worker is released. While
the call holds its worker, :data:`wire_context` holds the span's W3C trace context
(``{"traceparent": ...}``) in the call's task context, and :meth:`WorkerChannel.register` puts
it on the request as ``"context"``: the worker sees it as ``CallContext.trace_context``. A
worker's call-back through the host carries that context back (``CallbackRequest.context``);
:mod:`.callbacks` puts it in :data:`parent_context` while the call-back runs, so its span joins
the same trace as a child of the call that made it.

With no tracer installed (the default) a call pays one global read, and requests carry no
``context`` key. While one is installed, the blocking API's calls skip their caller-thread fast
path (which has no :class:`~.callpath.Call`) and take the loop's, so they are traced too; their
spans start a trace of their own (the caller thread's current span is not carried to the loop).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol

__all__ = [
    "ACTIVE_TRACER",
    "CallSpan",
    "CallTracer",
    "call_tracer",
    "parent_context",
    "set_call_tracer",
    "wire_context",
]

#: The trace context the next request written from this context carries (None: no key).
wire_context: ContextVar[dict[str, str] | None] = ContextVar("mlbridge_wire_context", default=None)
#: The trace context a call-back arrived with (the worker's current call's): a tracer makes
#: it the parent of the call-back's span, so one trace runs through the worker and back.
parent_context: ContextVar[dict[str, str] | None] = ContextVar(
    "mlbridge_parent_context", default=None
)


class CallSpan(Protocol):
    #: W3C trace context of the span, sent to the worker (None sends nothing)
    wire: dict[str, str] | None

    def end(self, *, ok: bool, error_code: str | None, worker_id: str | None) -> None: ...


class CallTracer(Protocol):
    def start(self, framework: str, command: str, session_id: str | None) -> CallSpan: ...


#: ``[the installed tracer or None]`` (read directly on the hot paths; see call_tracer)
ACTIVE_TRACER: list[CallTracer | None] = [None]


def call_tracer() -> CallTracer | None:
    return ACTIVE_TRACER[0]


def set_call_tracer(tracer: CallTracer | None) -> CallTracer | None:
    """Install ``tracer`` for every host in this process (None removes it); returns the old one."""
    old, ACTIVE_TRACER[0] = ACTIVE_TRACER[0], tracer
    return old
