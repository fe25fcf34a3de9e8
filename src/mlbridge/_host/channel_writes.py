"""A worker channel's writing side, and a direct call's read of its own reply.

Theory of operation
-------------------
:class:`ChannelWrites` is the part of :class:`~.channel.WorkerChannel` that puts frames on the
worker's input: requests (each registered in ``pending`` under its id and written in one step
under ``_wlock``, so a call either reaches ``pending`` before the exit is handled or is refused
as undelivered), cancels and call-back replies. Requests are written from the loop thread, and
from a caller thread on the blocking API's direct path for a worker it has checked out
(:mod:`.direct`). :meth:`ChannelWrites.read_reply_now` is the direct paths' one read of the
output (the loop's, :mod:`.loop_direct`, or the caller thread's holding it): the reply taken
whole when it is exactly that, anything else routed as the loop's reader routes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from .._backends import WorkerTransport
from ..errors import WorkerCrashedError
from .connection import Connection
from .pending import Pending, SyncPending
from .tracecontext import wire_context

__all__ = ["ChannelWrites"]

_Future = asyncio.Future  # (loop.create_future() costs two more Python calls per call)


class ChannelWrites:
    """Requests, cancels and call-back replies onto a worker's input (see the module docstring);
    the attributes and the two methods below are :class:`~.channel.WorkerChannel`'s."""

    conn: Connection
    transport: WorkerTransport | None
    pending: dict[int, Pending | SyncPending]
    doomed: bool
    _gone: bool
    _wlock: threading.Lock
    _loop: asyncio.AbstractEventLoop

    @property
    def alive(self) -> bool:
        """Running and usable: a worker being killed is not handed another call."""
        return not self._gone and not self.doomed

    def undelivered_error(self, command: str) -> WorkerCrashedError:
        raise NotImplementedError  # WorkerChannel's

    def data_received(self, data: memoryview) -> None:
        raise NotImplementedError  # WorkerChannel's

    def _send(self, header: bytes, payload: bytes, command: str) -> None:
        assert self.transport is not None
        try:
            self.transport.write(header, payload)
        except BrokenPipeError as exc:
            raise self._input_gone(command) from exc

    def _input_gone(self, command: str) -> WorkerCrashedError:
        self.doomed = True  # its input is gone: it is dying; never hand it out again
        return self.undelivered_error(command)

    def send_callback_reply(self, msg: dict[str, Any]) -> None:
        if not self.alive:
            return
        header, payload = self.conn.callback_reply(msg)
        with self._wlock, contextlib.suppress(WorkerCrashedError):
            self._send(header, payload, "a call-back reply")

    def send_cancel(self, target: int) -> None:
        if not self.alive:
            return
        header, payload = self.conn.cancel(target)
        with self._wlock, contextlib.suppress(WorkerCrashedError):
            self._send(header, payload, "cancel")

    def register(
        self,
        pending: Pending | SyncPending,
        command: str,
        args: dict[str, Any],
        *,
        stream: bool = False,
        session_id: str | None = None,
    ) -> int:
        """Give a call an id, note where its request starts in the stream, and write it."""
        rid = self.conn.next_id()
        header, payload = self.conn.request(
            rid, command, args, stream=stream, session_id=session_id, context=wire_context.get()
        )
        # a loop call's reply is read by the loop: its output must be watched
        self._write_call(rid, pending, header, payload, command, type(pending) is not SyncPending)
        return rid

    def _write_call(
        self,
        rid: int,
        pending: Pending | SyncPending,
        header: bytes,
        payload: bytes,
        command: str,
        watch: bool,
    ) -> None:
        """Register ``pending`` under ``rid`` and write its request, atomically with respect
        to the exit (``_wlock``); ``watch``: the loop will read its reply (output parked no
        more). Raises the undelivered error when the worker is gone or its input closed."""
        with self._wlock:
            if self._gone or self.doomed:  # not alive
                raise self.undelivered_error(command)
            transport = self.transport
            assert transport is not None
            if watch:
                transport.watch_output()
            pending.start = transport.written
            self.pending[rid] = pending
            try:
                transport.write(header, payload)
            except BaseException as exc:
                self.pending.pop(rid, None)
                if isinstance(exc, BrokenPipeError):
                    raise self._input_gone(command) from exc
                raise

    def start_request(
        self,
        command: str,
        args: dict[str, Any],
        *,
        stream: bool = False,
        session_id: str | None = None,
    ) -> tuple[int, Pending]:
        pending = Pending(
            self._loop.create_future(), asyncio.Queue() if stream else None, command=command
        )
        rid = self.register(pending, command, args, stream=stream, session_id=session_id)
        return rid, pending

    def start_plain_request(self, command: str, args: dict[str, Any]) -> tuple[int, SyncPending]:
        """Loop thread, the worker checked out: register and write a plain call (no stream,
        session or trace context: the loop's direct call). It is registered as a
        :class:`SyncPending` (no future: the call usually ends before anything awaits it);
        :meth:`awaitable` turns it into a loop call when it must wait."""
        rid, header, payload = self.conn.plain_request(command, args)
        pending = SyncPending(command)
        # not watched yet: the caller reads the output once itself, then watch_output()s
        self._write_call(rid, pending, header, payload, command, False)
        return rid, pending

    def awaitable(self, rid: int, sync: SyncPending) -> Pending:
        """Loop thread: the call ``start_plain_request`` registered, as a loop call whose future
        gets its reply (or the error it already had); the output is watched again."""
        pending = Pending(_Future(loop=self._loop), None, sync.start, sync.command)
        if sync.error is not None:
            pending.future.set_exception(sync.error)
        elif sync.reply is not None:
            pending.future.set_result(sync.reply)
        elif self.pending.get(rid) is sync:
            self.pending[rid] = pending
        if self.transport is not None:
            self.transport.watch_output()  # the loop's reader reads the reply from now on
        return pending

    def start_sync_request(self, command: str, args: dict[str, Any]) -> tuple[int, SyncPending]:
        """From a caller thread: register and write a plain call (no stream, session or trace
        context); ``pending.wait()`` for it, or read the reply with the output held."""
        rid, header, payload = self.conn.plain_request(command, args)
        pending = SyncPending(command)
        self._write_call(rid, pending, header, payload, command, False)
        return rid, pending

    def read_reply_now(self, rid: int, pending: Pending | SyncPending) -> dict[str, Any] | int:
        """A direct call's one read, now (on the loop thread, or on the caller thread holding
        the output): the call's final reply when the worker wrote exactly that (taken as is:
        not routed, not settled); anything else is routed as the loop's reader would route
        it (it may settle the call). Else the bytes read, -1 (nothing yet) or 0 (the end)."""
        transport = self.transport
        view = -1 if transport is None else transport.read_view()
        if isinstance(view, int):
            return view
        assert transport is not None
        try:
            reply = self.conn.whole_reply(view, rid)
            if reply is None:
                n = len(view)
                self.data_received(view)
        finally:
            transport.end_view()
        if reply is None:
            return n
        self.took_reply(rid, pending, reply)
        return reply

    def took_reply(self, rid: int, pending: Pending | SyncPending, reply: dict[str, Any]) -> None:
        """A direct call read its own reply itself (not routed): forget the call; a
        :class:`SyncPending` still registered gets the reply (no settling: nobody waits)."""
        if self.pending.pop(rid, None) is pending and type(pending) is SyncPending:
            pending.reply = reply
        self.note_limit(reply)

    def note_limit(self, reply: dict[str, Any]) -> None:
        """Every final reply passes here: one saying the call hit a resource limit means the
        worker stops itself after it, so it is handed no further call."""
        if reply.get("error_code") == "resource_limit":
            self.doomed = True
