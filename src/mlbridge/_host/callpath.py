"""The one path every host call takes: hold a worker, bring it up to date, release, report.

:class:`Call` checks a worker out of the pool (a session's worker preferred), brings it up to
date (queued resource deletes, bridge-wide state it lacks), and at the end hands it back through
:meth:`Pool.release`, moves the session's affinity and emits the request event — for execute,
stream, the resource calls and call-backs alike. :func:`retry_undelivered` runs a call again on a
live worker while it failed only because its worker died before reading it (nothing ran), within
the call's timeout. Runs on the host's event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import MLBridgeError, WorkerCrashedError
from .pool import Pool, Worker
from .sessions import SessionStore
from .telemetry import RequestRecorder
from .tracecontext import CallSpan, call_tracer, wire_context

__all__ = ["Call", "retry_undelivered"]

log = logging.getLogger("mlbridge.host")
T = TypeVar("T")


class Call:
    """One call's hold on a worker: checkout + bring up to date, then release + report.

    ``async with Call(...) as worker:`` — the worker is released however the block ends.
    """

    __slots__ = (
        "caller",
        "code",
        "command",
        "ok",
        "pool",
        "prefer",
        "record",
        "session",
        "session_id",
        "span",
        "t0",
        "waited",
        "worker",
    )

    def __init__(
        self,
        pool: Pool,
        command: str,
        session_id: str | None,
        sessions: SessionStore,
        record: RequestRecorder,
        *,
        prefer: str | None = None,
        caller: Worker | None = None,
    ) -> None:
        self.pool = pool
        self.prefer = prefer
        self.caller = caller
        self.command = command
        self.session_id = session_id
        self.session = None if session_id is None else sessions.for_call(session_id, pool.name)
        self.record = record
        self.ok = False
        self.code: str | None = None
        self.t0 = 0.0
        self.waited = 0.0
        self.span: CallSpan | None = None
        self.worker: Worker

    async def __aenter__(self) -> Worker:
        prefer = self.prefer
        session = self.session
        if session is not None and session.worker_id is not None:
            prefer = session.worker_id
        self.t0 = time.perf_counter()
        pool = self.pool
        tracer = call_tracer()
        if tracer is not None:
            self._trace(tracer.start(pool.name, self.command, self.session_id))
        try:
            worker = self.worker = await pool.checkout(prefer=prefer, caller=self.caller)
        except BaseException as exc:
            if self.span is not None:
                self._end_span(False, getattr(exc, "code", None), None)
            raise
        self.waited = time.perf_counter() - self.t0
        if worker.pending_deletes or worker.state_version < pool.bridge_state.version:
            # needs_update(worker), inlined (every call passes here)
            try:
                await pool.bring_up_to_date(worker)
            except BaseException as exc:
                self.exit(exc)
                raise
        return worker

    async def __aexit__(self, et: object, exc: BaseException | None, tb: object) -> None:
        self.exit(exc)

    def exit(self, exc: BaseException | None) -> None:
        """Return the worker (see Pool.release for a call given up on), move the session's
        affinity, mark it used, and report the request."""
        if exc is None:
            self.ok = True
        elif isinstance(exc, MLBridgeError):
            self.code = exc.code
        worker = self.worker
        if self.span is not None:
            self._end_span(self.ok, self.code, worker.id)
        self.pool.release(worker, ok=self.ok)
        if self.session is not None:
            self.session.used(worker.id if worker.alive else None)
        self.record(
            self.pool.name,
            self.command,
            time.perf_counter() - self.t0,
            self.ok,
            worker.id,
            self.code,
            self.session_id,
            self.waited,
        )

    def _trace(self, span: CallSpan) -> None:
        self.span = span
        # Requests written from this task now carry the span's context (channel.register).
        wire_context.set(span.wire)

    def _end_span(self, ok: bool, code: str | None, worker_id: str | None) -> None:
        span, self.span = self.span, None
        wire_context.set(None)
        if span is not None:
            try:
                span.end(ok=ok, error_code=code, worker_id=worker_id)
            except Exception:
                log.exception("ending the call's trace span failed")


async def retry_undelivered(
    timeout: float | None, attempt: Callable[[float | None], Awaitable[T]]
) -> T:
    """Run ``attempt(timeout_left)``; while it fails because its worker died before the
    request reached it (nothing ran), run it again on a live worker, within ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    left = timeout
    while True:
        try:
            return await attempt(left)
        except WorkerCrashedError as exc:
            if not exc.details.get("undelivered"):
                raise
            if deadline is not None and time.monotonic() >= deadline:
                raise
            log.info("running the call again on another worker: %s", exc.message)
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
