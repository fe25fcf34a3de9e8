"""Server-Sent Events over an :class:`~mlbridge.AsyncStream`.

The first item is awaited before the response starts, so a call that fails at once (unknown
bridge, unknown command, bad arguments) is an ordinary 4xx response, not a 200 stream holding an
error. After that every chunk is one event, written as soon as the worker sends it. A failure
mid-stream becomes an ``error`` event (the status line has gone already). A client that goes
away closes the stream, which cancels the call in the worker.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse

from mlbridge._streams import AsyncStream
from mlbridge.errors import MLBridgeError

from . import _errors
from ._encode import to_json_bytes

__all__ = ["SSE_HEADERS", "event", "prefetch", "sse_response"]

log = logging.getLogger("mlbridge.gateway")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_END = object()


def event(data: Any, name: str | None = None) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    body = data if isinstance(data, bytes) else to_json_bytes(data)
    return head + b"data: " + body + b"\n\n"


async def prefetch(stream: AsyncStream) -> Any:
    """The stream's first chunk (``_END`` when it has none); errors propagate to the caller."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _END


def sse_response(
    stream: AsyncStream,
    first: Any,
    *,
    on_chunk: Callable[[Any], list[bytes]],
    on_end: Callable[[Any], list[bytes]],
    on_error: Callable[[_errors.HTTPError], list[bytes]],
) -> StreamingResponse:
    """Stream ``first`` and the rest of ``stream`` as events built by the three callbacks."""

    async def body() -> AsyncIterator[bytes]:
        try:
            if first is not _END:
                for piece in on_chunk(first):
                    yield piece
                async for chunk in stream:
                    for piece in on_chunk(chunk):
                        yield piece
            for piece in on_end(stream.result):
                yield piece
        except Exception as exc:
            if not isinstance(exc, MLBridgeError):
                log.exception("unexpected error in a stream")
            for piece in on_error(_errors.from_exception(exc)):
                yield piece
        finally:
            await stream.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
