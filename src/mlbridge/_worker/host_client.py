"""Calls from a worker back through the host (``self.host.call`` in a bridge).

Theory of operation
-------------------
A handler on the main thread (or a thread it started) calls :meth:`HostClient.call`. That sends a
``{"cb": n, ...}`` frame with an id from the worker's own id space and blocks on a per-call queue.
Before sending, it asks the server for a reader (``want_reader``: the control thread takes the
pipe at once, since the main thread is busy waiting here). The reading thread hands frames keyed
``"cb"`` to :meth:`HostClient.deliver`, which puts them on the matching queue. The caller wakes
on chunks (for :meth:`stream`) and on the final reply. While waiting it watches the timeout and
the enclosing call's cancel flag; giving up sends ``{"cb_cancel": n}`` so the host can drop the
work.

Callbacks exist only when the host announced the ``callbacks`` capability in ``hello``: a v1
host (DSPEx) never sees a worker-initiated frame.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

from .._protocol.messages import CallbackRequest, Failure
from .._protocol.wire_errors import exception_from_failure
from ..errors import CallbackError, CallTimeoutError, CancelledCallError
from .transport import Transport

__all__ = ["HostClient", "current"]

_POLL = 0.05
_CLOSED = object()


_current: HostClient | None = None


def current() -> HostClient:
    """This worker's handle on the host (for tools given by import path, such as DSPy's)."""
    if _current is None:
        raise RuntimeError(
            "no host to call: this runs outside an mlbridge worker. Fix: call the bridge with "
            "MLBridge.execute from the host process instead"
        )
    return _current


class HostClient:
    """A handle on the host, for calling other bridges (or this one) from inside a handler."""

    def __init__(
        self,
        transport: Transport,
        *,
        current_call: Callable[[], Any],
        default_timeout: float = 300.0,
        want_reader: Callable[[], None] | None = None,
    ) -> None:
        self._transport = transport
        self._current_call = current_call
        self._want_reader = want_reader
        self.default_timeout = default_timeout
        self.enabled = False
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, queue.SimpleQueue[Any]] = {}
        self._closed_reason: str | None = None
        global _current
        _current = self  # a worker has one: tools imported by path reach it with current()

    @property
    def available(self) -> bool:
        return self.enabled and self._closed_reason is None

    def call(
        self,
        bridge: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session_id: str | None = None,
    ) -> Any:
        """Run ``command`` on ``bridge`` through the host and return its result (blocking)."""
        final = None
        for kind, payload in self._run(bridge, command, args, timeout, session_id, stream=False):
            if kind == "final":
                final = payload
        return final

    def stream(
        self,
        bridge: str,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session_id: str | None = None,
    ) -> Generator[Any, None, Any]:
        """Yield the chunks of a streamed call on ``bridge``; return its final result."""
        final = None
        for kind, payload in self._run(bridge, command, args, timeout, session_id, stream=True):
            if kind == "chunk":
                yield payload
            else:
                final = payload
        return final

    def _run(
        self,
        bridge: str,
        command: str,
        args: dict[str, Any] | None,
        timeout: float | None,
        session_id: str | None,
        *,
        stream: bool,
    ) -> Iterator[tuple[str, Any]]:
        if not self.enabled:
            raise CallbackError(
                "calls back to the host need a host that negotiated callbacks in 'hello' "
                "(mlbridge's host does; a v1/DSPEx host does not)"
            )
        if self._closed_reason is not None:
            raise CallbackError(f"cannot call {bridge}:{command}: {self._closed_reason}")
        call = self._current_call()
        if session_id is None and call is not None:
            session_id = call.session_id
        timeout = self.default_timeout if timeout is None else timeout
        cb = next(self._ids)
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._lock:
            self._pending[cb] = q
        deadline = time.monotonic() + timeout
        finished = False
        try:
            if self._want_reader is not None:
                self._want_reader()  # someone must read the reply while this thread waits
            self._transport.send(
                CallbackRequest(
                    cb,
                    bridge,
                    command,
                    args or {},
                    stream,
                    timeout,
                    session_id,
                    call.trace_context if call is not None else None,
                ).to_wire()
            )
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CallTimeoutError(
                        f"call back to {bridge}:{command} got no reply within {timeout:g}s"
                    )
                if call is not None and call.cancelled:
                    raise CancelledCallError(
                        f"call {call.id} was cancelled while waiting on {bridge}:{command}"
                    )
                try:
                    msg = q.get(timeout=min(remaining, _POLL))
                except queue.Empty:
                    continue
                if msg is _CLOSED:
                    raise CallbackError(
                        f"call back to {bridge}:{command} lost: {self._closed_reason}"
                    )
                if "chunk" in msg:
                    yield "chunk", msg["chunk"]
                    continue
                finished = True
                if msg.get("success"):
                    yield "final", msg.get("result")
                    return
                raise exception_from_failure(
                    Failure.from_wire(msg, key="cb"), context=f"{bridge}:{command}"
                )
        finally:
            with self._lock:
                self._pending.pop(cb, None)
            if not finished and self._closed_reason is None:
                try:
                    self._transport.send({"cb_cancel": cb})
                except Exception:
                    pass

    def deliver(self, msg: dict[str, Any]) -> None:
        """Control thread: route a host reply to the waiting caller (late replies are dropped)."""
        cb = msg.get("cb")
        with self._lock:
            q = self._pending.get(cb) if isinstance(cb, int) else None
        if q is not None:
            q.put(msg)

    def close(self, reason: str) -> None:
        self._closed_reason = reason
        with self._lock:
            waiting = list(self._pending.values())
        for q in waiting:
            q.put(_CLOSED)
