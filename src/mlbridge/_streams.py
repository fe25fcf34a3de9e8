"""Stream objects of the public API: iterate the chunks, then read the final ``result``.

A streaming handler yields chunks and then returns a value (a generator's return value); the
worker sends that value as the stream's final reply. :class:`AsyncStream` and :class:`Stream`
iterate the chunks and keep the final reply in :attr:`result` once the stream is exhausted.
Closing a stream early (``break`` then ``close()``, leaving an ``async with``/``with`` block, or
garbage collection of a sync stream) cancels the call in the worker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["AsyncStream", "Stream"]

T = TypeVar("T")
_UNSET: Any = object()


class AsyncStream:
    """The chunks of a streaming call (``async for``), then :attr:`result`."""

    def __init__(self, start: Callable[[list[Any]], AsyncIterator[Any]]) -> None:
        self._start = start
        self._agen: AsyncIterator[Any] | None = None
        self._final: list[Any] = []
        self._done = False

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        if self._agen is None:
            self._agen = self._start(self._final)
        try:
            return await self._agen.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise
        except BaseException:
            self._done = True
            raise

    @property
    def done(self) -> bool:
        """Whether the stream has ended (exhausted, failed or closed)."""
        return self._done

    @property
    def result(self) -> Any:
        """The call's final reply (the streaming handler's return value).

        Raises :class:`RuntimeError` before the stream has been iterated to its end.
        """
        if not self._done or not self._final:
            raise RuntimeError(
                "the stream's result is known only after its last chunk: iterate it to the end "
                "(a stream closed early or failed has no result)"
            )
        return self._final[0]

    async def aclose(self) -> None:
        """Stop early: the worker cancels the call. Idempotent."""
        self._done = True
        agen, self._agen = self._agen, None
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Stream:
    """Blocking twin of :class:`AsyncStream`: ``for chunk in stream``, then :attr:`result`."""

    def __init__(
        self, inner: AsyncStream, run: Callable[[Awaitable[Any]], Any], alive: Callable[[], bool]
    ) -> None:
        self._inner = inner
        self._run = run
        self._alive = alive
        self._closed = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        try:
            return self._run(self._inner.__anext__())
        except StopAsyncIteration:
            self._closed = True
            raise StopIteration from None

    @property
    def done(self) -> bool:
        return self._inner.done

    @property
    def result(self) -> Any:
        return self._inner.result

    def close(self) -> None:
        """Stop early: the worker cancels the call. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._alive():
            self._run(self._inner.aclose())

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and not self._inner.done:
            try:
                self.close()
            except Exception:
                pass
