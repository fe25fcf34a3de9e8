"""Typed wire messages and their dict shapes, sans I/O.

Host -> worker ``Request``: ``{"id", "command", "args", ["stream"], ["session_id"], ["context"]}``;
extra keys (the DSPEx ``timestamp``) are ignored. ``context`` carries the caller's trace context
as W3C Trace Context strings (``{"traceparent": "00-<trace id>-<span id>-01"}``, optionally
``"tracestate"``); it is sent only while a call is traced. Worker -> host replies echo the id:
``Success`` ``{"id", "success": true, "result", "timestamp"}``, ``Failure``
``{"id", "success": false, "error", "error_type", "error_code", ["traceback"], "timestamp"}`` and,
for streamed calls, ``Chunk`` ``{"id", "chunk"}`` frames before the final reply.

Worker-initiated calls use their own id space under the key ``"cb"``: the worker sends
``CallbackRequest`` ``{"cb", "bridge", "command", "args", "stream", "timeout", "session_id",
["context"]}`` (``context``: the trace context of the call it is handling, when traced) and
the host answers with the same three reply shapes keyed by ``"cb"`` instead of ``"id"``.
``{"cb_cancel": n}`` withdraws a callback the worker gave up on.

A frame whose request id cannot be read (undecodable, oversized, not an object) gets a failure
with id 0 on the v1 wire, as the original DSPex host expects; after ``hello`` it carries
``"id": null`` and ``"unreadable": true`` instead (:attr:`Failure.unreadable`), so it is never
mistaken for the reply to request 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CONTROL_COMMANDS",
    "PROTOCOL_VERSION",
    "CallbackRequest",
    "Chunk",
    "Failure",
    "MessageError",
    "Request",
    "Success",
    "parse_request",
    "request_wire",
    "split_namespace",
    "timestamp",
]

PROTOCOL_VERSION = 2
# Answered by the worker's control thread at once, even while a long call runs.
CONTROL_COMMANDS = frozenset({"ping", "heartbeat", "cancel", "hello"})


_ts_cache: tuple[int, str] = (-1, "")
_time_us = time.time_ns


def timestamp() -> str:
    """Now, as ISO 8601 UTC with microseconds (``2024-05-01T10:00:00.123456+00:00``).

    Every reply carries one, so the date part (with a ``%06d`` slot for the microseconds) is
    formatted once per second and cached.
    """
    global _ts_cache
    sec, us = divmod(_time_us() // 1000, 1_000_000)
    cached_sec, template = _ts_cache
    if sec != cached_sec:
        prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        template = prefix + ".%06d+00:00"
        _ts_cache = (sec, template)
    return template % us


class MessageError(ValueError):
    """A decoded frame is not a valid message; ``id`` is the request id when it could be read."""

    def __init__(self, message: str, id: int = 0) -> None:
        super().__init__(message)
        self.id = id


@dataclass(slots=True)
class Request:
    id: int
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    session_id: str | None = None
    #: the caller's W3C trace context (``traceparent``, ``tracestate``), when traced
    context: dict[str, str] | None = None

    def to_wire(self) -> dict[str, Any]:
        return request_wire(
            self.id, self.command, self.args, self.stream, self.session_id, self.context
        )


def request_wire(
    rid: int,
    command: str,
    args: dict[str, Any],
    stream: bool,
    session_id: str | None,
    context: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A :class:`Request`'s wire shape, built without the object (the host's hot path)."""
    out: dict[str, Any] = {"id": rid, "command": command, "args": args}
    if stream:
        out["stream"] = True
    if session_id is not None:
        out["session_id"] = session_id
    if context is not None:
        out["context"] = context
    return out


@dataclass(slots=True)
class Success:
    id: int
    result: Any
    extra: dict[str, Any] | None = None

    def to_wire(self, key: str = "id") -> dict[str, Any]:
        out = {key: self.id, "success": True, "result": self.result, "timestamp": timestamp()}
        if self.extra:
            out.update(self.extra)
        return out


@dataclass(slots=True)
class Failure:
    id: int
    error: str
    error_type: str = "Exception"
    error_code: str = "unknown"
    traceback: str | None = None
    details: dict[str, Any] | None = None
    #: the request's id could not be read (undecodable, oversized or id-less frame): on the v1
    #: wire the failure goes out with id 0 (what the original host expects); on a connection
    #: negotiated with ``hello`` as ``"id": null, "unreadable": true``, so it can never be
    #: taken for the reply to a request whose id is 0.
    unreadable: bool = False

    def to_wire(self, key: str = "id") -> dict[str, Any]:
        out: dict[str, Any] = {
            key: None if self.unreadable else self.id,
            "success": False,
            "error": self.error,
            "error_type": self.error_type,
            "error_code": self.error_code,
            "timestamp": timestamp(),
        }
        if self.traceback:
            out["traceback"] = self.traceback
        if self.details:
            out["details"] = self.details
        if self.unreadable:
            out["unreadable"] = True
        return out

    @classmethod
    def from_wire(cls, msg: dict[str, Any], key: str = "id") -> Failure:
        return cls(
            id=msg.get(key, 0),
            error=str(msg.get("error", "unknown error")),
            error_type=str(msg.get("error_type", "Exception")),
            error_code=str(msg.get("error_code", "unknown")),
            traceback=msg.get("traceback"),
            details=msg.get("details"),
        )


@dataclass(slots=True)
class Chunk:
    id: int
    chunk: Any

    def to_wire(self, key: str = "id") -> dict[str, Any]:
        return {key: self.id, "chunk": self.chunk}


@dataclass(slots=True)
class CallbackRequest:
    cb: int
    bridge: str
    command: str
    args: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    timeout: float | None = None
    session_id: str | None = None
    context: dict[str, str] | None = None

    def to_wire(self) -> dict[str, Any]:
        out = {
            "cb": self.cb,
            "bridge": self.bridge,
            "command": self.command,
            "args": self.args,
            "stream": self.stream,
            "timeout": self.timeout,
            "session_id": self.session_id,
        }
        if self.context is not None:
            out["context"] = self.context
        return out

    @classmethod
    def from_wire(cls, msg: dict[str, Any]) -> CallbackRequest:
        cb = msg.get("cb")
        bridge, command, args = msg.get("bridge"), msg.get("command"), msg.get("args", {})
        if not isinstance(cb, int) or not isinstance(bridge, str) or not isinstance(command, str):
            raise MessageError("callback needs integer 'cb', string 'bridge' and 'command'")
        if not isinstance(args, dict):
            raise MessageError("callback 'args' must be an object", cb)
        timeout = msg.get("timeout")
        return cls(
            cb,
            bridge,
            command,
            args,
            bool(msg.get("stream", False)),
            float(timeout) if timeout is not None else None,
            msg.get("session_id"),
            _trace_context(msg.get("context")),
        )


def parse_request(msg: Any) -> Request:
    """Validate a decoded host->worker frame; raise :class:`MessageError` naming the problem."""
    if not isinstance(msg, dict):
        raise MessageError(
            f"a request must be an object with 'id' and 'command', got {type(msg).__name__}"
        )
    rid = msg.get("id")
    if type(rid) is not int or rid < 0:
        if "id" not in msg:
            raise MessageError('request has no \'id\': send {"id": <int >= 0>, "command": ...}')
        raise MessageError(f"request 'id' must be an integer >= 0, got {rid!r}")
    command = msg.get("command")
    if not isinstance(command, str) or not command:
        raise MessageError('request has no \'command\' string: send {"id", "command", "args"}', rid)
    args = msg.get("args")
    if args is None:
        args = {}
    elif not isinstance(args, dict):
        raise MessageError(f"request 'args' must be an object, got {type(args).__name__}", rid)
    session_id = msg.get("session_id")
    context = msg.get("context")
    if context is not None:
        context = _trace_context(context)
    return Request(rid, command, args, msg.get("stream") is True, session_id, context)


def _trace_context(value: Any) -> dict[str, str] | None:
    """A wire ``context``'s string entries; None for none or a malformed one (trace context is
    advisory: it never fails a call)."""
    if type(value) is not dict:
        return None
    out = {k: v for k, v in value.items() if type(k) is str and type(v) is str}
    return out or None


def split_namespace(command: str) -> tuple[str | None, str]:
    """``"dspy:create_program"`` -> ``("dspy", "create_program")``; no colon -> ``(None, cmd)``."""
    ns, sep, name = command.partition(":")
    if not sep:
        return None, command
    return ns, name
