"""One worker process and its pipes, driven from the host's event loop.

Theory of operation
-------------------
A :class:`WorkerChannel` is created and used only on the host's event loop thread. A backend
(:mod:`mlbridge._backends`) starts ``python -m mlbridge.worker`` and hands over three
non-blocking pipe fds and an exit fd; the loop watches them with ``add_reader``. Writes go
straight to the pipe with ``os.write`` and queue only when the pipe is full, and reads land in one
reusable buffer, so the hot path has no transport or protocol objects in between. Bytes from
stdout are fed to a sans-I/O
:class:`FrameDecoder`, each frame is decoded and routed by id to the :class:`Pending` entry of
the call that is waiting for it (a future, plus a queue of stream chunks). stderr is drained
continuously into a bounded tail (a worker must never block on a full stderr pipe) and logged.

Frames keyed ``"cb"`` are calls from the worker back through the host; they are handed to the
``on_callback`` coroutine given by the pool, and their replies are written back keyed ``"cb"``.

Ownership: the pool decides *who* may send a call on a channel (checkout); the channel only
guarantees that replies reach the right caller and that, when the process exits, every pending
caller fails at once with :class:`WorkerCrashedError` naming the exit code or signal, the likely
cause and the stderr tail. Nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .._backends import Backend, WorkerHandle, get_backend
from .._protocol.codec import Codec, JsonCodec, get_codec
from .._protocol.exit_codes import BOOT_ERROR_MARKER
from .._protocol.framing import FrameDecoder, OversizedFrame, frame_header
from .._protocol.messages import PROTOCOL_VERSION, Failure
from .._protocol.wire_errors import exception_from_failure
from ..errors import (
    CallTimeoutError,
    MLBridgeError,
    ProtocolError,
    WorkerCrashedError,
)
from .exits import ExitInfo, unread_bytes
from .pending import EXITED, Expired, Pending, SyncPending, expire

__all__ = ["ExitInfo", "WorkerChannel"]

_STDERR_TAIL_LINES = 40
_READ_SIZE = 1 << 20
# An idle asyncio loop polls for a call's reply this long before sleeping (uvloop: never; its
# ready queue cannot be seen, so it always sleeps in epoll).
ASYNC_SPIN_S = 100e-6
# Polling only pays when the worker can run on another CPU meanwhile.
MANY_CPUS = len(getattr(os, "sched_getaffinity", lambda _: {0, 1})(0)) > 1
# Calls awaiting a reply on this process's loop(s); polling only pays when there is one.
_LOOP_CALLS = [0]
_ids = itertools.count(1)


CallbackHandler = Callable[["WorkerChannel", dict[str, Any]], Coroutine[Any, Any, None]]


@dataclass(eq=False)
class WorkerChannel:
    """A live worker: spawn it, talk to it, watch it die."""

    bridge: str
    worker_id: str
    argv: list[str]
    env: dict[str, str]
    max_frame_bytes: int
    on_callback: CallbackHandler | None = None
    on_exit: Callable[[WorkerChannel], None] | None = None
    backend: Backend | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("mlbridge.worker"))

    def __post_init__(self) -> None:
        self.codec: Codec = JsonCodec()
        self.decoder = FrameDecoder(self.max_frame_bytes)
        self.pending: dict[int, Pending | SyncPending] = {}
        self.callbacks: dict[int, asyncio.Task[None]] = {}
        self.stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self.boot_error: dict[str, Any] | None = None
        self.handle: WorkerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_fd = self._out_fd = self._err_fd = self._pidfd = -1
        self._poll_handle: asyncio.TimerHandle | None = None
        self._wbuf = bytearray()  # bytes the pipe would not take yet (drained by a writer callback)
        # Writes come from the loop thread and, on MLBridge's direct path, from caller threads.
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()  # the output fd, decoder and read buffer
        self._written = 0  # bytes of frames handed to the input pipe (or its buffer) so far
        self._consumed: int | None = None  # how many of them the worker read, once it exited
        self._loop_thread: int | None = None
        self._writer_on = False
        self._input_closed = False
        self._close_after_drain = False
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._err_buf = bytearray()
        self.pid: int | None = None
        self.returncode: int | None = None
        self.exited = asyncio.get_running_loop().create_future()
        self.started_at = time.monotonic()
        self.hello: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self.closing = False
        self.doomed = False
        self.kill_reason: str | None = None

    # ------------------------------------------------------------------ lifecycle
    async def spawn(self) -> None:
        """Start the process through the backend; watch its pipes and exit fd from the loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        backend = self.backend or get_backend("local")
        # A local fork+exec blocks the loop for about a millisecond; asyncio's own subprocess
        # transports would cost more than that on every frame (see the module docstring).
        handle = self.handle = backend.spawn(self.argv, self.env)
        self.pid = handle.pid
        self._in_fd, self._out_fd, self._err_fd = (
            handle.stdin_fd,
            handle.stdout_fd,
            handle.stderr_fd,
        )
        loop.add_reader(self._out_fd, self._read_stdout)
        loop.add_reader(self._err_fd, self._read_stderr)
        self._pidfd = handle.exit_fd
        if self._pidfd >= 0:
            loop.add_reader(self._pidfd, self._on_pidfd)
        else:  # no pidfd (old kernel, or a backend without one): notice the exit by polling
            self._poll_handle = loop.call_later(0.05, self._poll_exit)

    async def handshake(self, codec: str, timeout: float) -> dict[str, Any]:
        """``hello``: protocol version, codec, callbacks. The worker is ready once this returns."""
        reply = await self.request(
            "hello",
            {
                "protocol_version": PROTOCOL_VERSION,
                "codecs": [codec, "json"],
                "capabilities": ["callbacks", "streaming", "binary"],
            },
            timeout=timeout,
        )
        self.codec = get_codec(str(reply["codec"]))
        self.hello = reply
        return dict(reply)

    @property
    def running(self) -> bool:
        """The process has not exited (as far as the loop has noticed)."""
        return self.returncode is None and not self.exited.done()

    @property
    def alive(self) -> bool:
        """Running and usable: a worker being killed is not handed another call."""
        return self.running and not self.doomed

    def exit_info(self) -> ExitInfo:
        return ExitInfo(self.returncode, "\n".join(self.stderr_tail), self.boot_error)

    def undelivered_error(self, command: str) -> WorkerCrashedError:
        """The worker was gone before the request reached it (nothing ran: safe to retry)."""
        exc = self.crash_error(f"{command!r} (the request was never delivered)")
        exc.details["undelivered"] = True
        return exc

    def crash_error(self, during: str) -> WorkerCrashedError:
        info = self.exit_info()
        reason = f" ({self.kill_reason})" if self.kill_reason else ""
        msg = (
            f"worker {self.worker_id} of {self.bridge!r} {info.describe()}{reason} during {during}"
        )
        if info.boot_error:
            msg += f"; boot error: {info.boot_error.get('error')}"
        if info.stderr_tail:
            tail = "\n".join(list(self.stderr_tail)[-12:])
            msg += f"\n--- worker stderr (last lines) ---\n{tail}"
        return WorkerCrashedError(
            msg, exit_code=self.returncode, worker_id=self.worker_id, pid=self.pid
        )

    def kill(self, reason: str, sig: int = signal.SIGKILL) -> None:
        """Signal the worker's whole process group (it runs in its own session)."""
        if self.kill_reason is None:
            self.kill_reason = reason
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.doomed = True
        if self.handle is None or not self.running:
            return
        self.handle.signal(sig)

    async def close(self, timeout: float) -> None:
        """Close stdin (the worker exits 0), then TERM, then KILL the process group."""
        self.closing = True
        self.close_input()
        for sig, wait in (
            (None, timeout / 2),
            (signal.SIGTERM, timeout / 2),
            (signal.SIGKILL, 5.0),
        ):
            if sig is not None:
                self.kill("shutting down", sig)
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), wait)
                break
            except TimeoutError:
                continue

    # ------------------------------------------------------------------ I/O
    def _write(self, msg: dict[str, Any]) -> None:
        with self._wlock:
            self._write_locked(msg)

    def _write_locked(self, msg: dict[str, Any]) -> None:
        if self._input_closed or not self.alive:
            raise (
                self.undelivered_error(str(msg.get("command", "a write")))
                if not self.alive
                else ProtocolError(f"worker {self.worker_id} input is closed")
            )
        payload = self.codec.encode(msg)
        if len(payload) > self.max_frame_bytes:
            raise ProtocolError(
                f"request of {len(payload)} bytes exceeds max_frame_bytes={self.max_frame_bytes}; "
                "send it in pieces or raise the bridge option max_frame_bytes"
            )
        header = frame_header(len(payload))
        self._written += 4 + len(payload)
        if self._wbuf:
            self._wbuf += header
            self._wbuf += payload
            return
        try:
            if len(payload) < 65536:
                data = header + payload
                n = os.write(self._in_fd, data)
                if n < len(data):
                    self._buffer_rest(memoryview(data)[n:])
            else:
                n = os.writev(self._in_fd, (header, payload))
                if n < 4 + len(payload):
                    self._wbuf += header[n:] if n < 4 else b""
                    self._buffer_rest(memoryview(payload)[max(0, n - 4) :])
        except BlockingIOError:
            self._wbuf += header
            self._buffer_rest(memoryview(payload))
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.doomed = True  # its input is closed: it is dying; never hand it out again
            raise self.undelivered_error(str(msg.get("command", "a write"))) from exc

    def _buffer_rest(self, rest: memoryview) -> None:
        self._wbuf += rest
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            self._start_writer()
        else:
            self._loop.call_soon_threadsafe(self._start_writer)

    def _start_writer(self) -> None:
        if not self._writer_on and self._in_fd >= 0:
            assert self._loop is not None
            self._writer_on = True
            self._loop.add_writer(self._in_fd, self._drain_input)

    def _drain_input(self) -> None:
        with self._wlock:
            try:
                n = os.write(self._in_fd, self._wbuf)
            except BlockingIOError:
                return
            except OSError:
                n = len(self._wbuf)  # the worker is gone; its exit is handled elsewhere
            del self._wbuf[:n]
            if self._wbuf:
                return
            assert self._loop is not None
            self._loop.remove_writer(self._in_fd)
            self._writer_on = False
        if self._close_after_drain:
            self._close_in_fd()

    def close_input(self) -> None:
        """Close the worker's stdin once buffered frames are written (it then exits 0)."""
        if self._input_closed:
            return
        self._input_closed = True
        if self._wbuf and self.running:
            self._close_after_drain = True
        else:
            self._close_in_fd()

    def _close_in_fd(self) -> None:
        if self._in_fd >= 0:
            if self._loop is not None and self._writer_on:
                self._loop.remove_writer(self._in_fd)
                self._writer_on = False
            self._wbuf.clear()
            if self.handle is not None:
                self.handle.close_stdin()
            self._in_fd = -1

    # -- reading (loop callbacks) -------------------------------------------------------
    def _read_stdout(self) -> None:
        with self._rlock:  # a caller thread may be reading a direct call's reply itself
            try:
                n = os.readv(self._out_fd, [self._rbuf])
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:
                assert self._loop is not None
                self._loop.remove_reader(self._out_fd)
                return
            self._on_stdout(self._rview[:n])

    def poll_reply(self, rid: int, pending: SyncPending, spin_s: float) -> None:
        """Caller thread, direct path: read our own output for up to ``spin_s`` seconds.

        While the caller polls, a fast reply needs no thread to be woken at all (the loop thread
        would otherwise wake from epoll, then wake the caller). Frames that are not this call's
        reply (call-backs, heartbeat replies) go to the loop thread in order; anything odd is
        left to the loop entirely. The loop's own reader takes the same lock.
        """
        deadline = time.perf_counter() + spin_s
        loop = self._loop
        assert loop is not None
        while pending.reply is None and pending.error is None:
            if self._rlock.acquire(blocking=False):
                try:
                    try:
                        n = os.readv(self._out_fd, [self._rbuf])
                    except OSError:  # EAGAIN, or the fd is already gone
                        n = -1
                    if n > 0:
                        for frame in self.decoder.feed(self._rview[:n]):
                            self._caller_frame(frame, rid, pending, loop)
                finally:
                    self._rlock.release()
                if n == 0:
                    return  # end of output: the loop notices the exit and fails the call
            if time.perf_counter() >= deadline:
                return
            os.sched_yield()  # a worker sharing this CPU gets to run and answer

    def _caller_frame(
        self,
        frame: bytes | OversizedFrame,
        rid: int,
        pending: SyncPending,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        if isinstance(frame, bytes):
            try:
                msg = self.codec.decode(frame)
            except MLBridgeError:
                msg = None
            if type(msg) is dict and msg.get("id") == rid and "chunk" not in msg:
                if self.pending.pop(rid, None) is pending:
                    pending.settle(msg)
                return
            if msg is not None:
                loop.call_soon_threadsafe(self._route, msg)
                return
        loop.call_soon_threadsafe(self._on_frames, [frame])

    def _read_stderr(self) -> None:
        try:
            data = os.read(self._err_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            assert self._loop is not None
            self._loop.remove_reader(self._err_fd)
            self._flush_stderr()
            return
        buf = self._err_buf
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > 65536:
                    self._flush_stderr()
                break
            line = buf[:nl].decode(errors="replace")
            del buf[: nl + 1]
            self._on_stderr_line(line)

    def _flush_stderr(self) -> None:
        if self._err_buf:
            self._on_stderr_line(self._err_buf.decode(errors="replace"))
            self._err_buf.clear()

    def _on_pidfd(self) -> None:
        assert self.handle is not None
        if self.handle.poll() is not None:
            self._finish_exit()

    def _poll_exit(self) -> None:
        assert self.handle is not None and self._loop is not None
        if self.handle.poll() is None:
            self._poll_handle = self._loop.call_later(0.05, self._poll_exit)
        else:
            self._finish_exit()

    def _finish_exit(self) -> None:
        """The process is gone: drain what it left in the pipes, release fds, fail callers."""
        loop = self._loop
        assert loop is not None and self.handle is not None
        if self._pidfd >= 0:
            loop.remove_reader(self._pidfd)
            self._pidfd = -1
        with self._rlock:
            while self._out_fd >= 0:
                try:
                    n = os.readv(self._out_fd, [self._rbuf])
                except OSError:
                    n = 0
                if n <= 0:
                    break
                self._on_stdout(self._rview[:n])
        with contextlib.suppress(OSError):
            while data := os.read(self._err_fd, 65536):
                self._err_buf += data
        for line in self._err_buf.decode(errors="replace").splitlines():
            self._on_stderr_line(line)
        self._err_buf.clear()
        loop.remove_reader(self._out_fd)
        loop.remove_reader(self._err_fd)
        self._consumed = self._written - len(self._wbuf) - unread_bytes(self._in_fd)
        self._input_closed = True
        self._close_in_fd()
        with self._rlock:
            self.handle.release()
            self._out_fd = self._err_fd = -1
        self._on_exit()

    def _on_stdout(self, data: bytes | memoryview) -> None:
        self._on_frames(self.decoder.feed(data))

    def _on_frames(self, frames: list[bytes | OversizedFrame]) -> None:
        for frame in frames:
            if isinstance(frame, OversizedFrame):
                self.logger.error(
                    "worker %s sent a %d-byte frame over max_frame_bytes=%d; killing it",
                    self.worker_id,
                    frame.length,
                    frame.limit,
                )
                self.kill("it sent an oversized frame")
                return
            try:
                msg = self.codec.decode(frame)
            except MLBridgeError as exc:
                self.logger.error("undecodable frame from %s: %s; killing it", self.worker_id, exc)
                self.kill("it sent an undecodable frame")
                return
            self._route(msg)

    def _route(self, msg: Any) -> None:
        if type(msg) is not dict:
            self.logger.warning("ignoring non-object frame from %s: %r", self.worker_id, msg)
            return
        rid = msg.get("id")
        if rid is not None:
            pending = self.pending.get(rid)
            if pending is None:
                if rid == 0 and msg.get("success") is False:
                    self.logger.error(
                        "worker %s protocol failure: %s", self.worker_id, msg.get("error")
                    )
                return
            if isinstance(pending, SyncPending):
                if "chunk" not in msg:
                    del self.pending[rid]
                    pending.settle(msg)
                return
            if "chunk" in msg:
                if pending.chunks is not None:
                    pending.chunks.put_nowait(msg["chunk"])
                return
            del self.pending[rid]
            if not pending.future.done():
                pending.future.set_result(msg)
            return
        if "cb" in msg and "bridge" in msg:
            if self.on_callback is not None:
                cb = msg["cb"]
                task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
                    self.on_callback(self, msg)
                )
                self.callbacks[cb] = task
                task.add_done_callback(lambda _t: self.callbacks.pop(cb, None))
            return
        if "cb_cancel" in msg:
            withdrawn = self.callbacks.pop(msg["cb_cancel"], None)
            if withdrawn is not None:
                withdrawn.cancel()

    def send_callback_reply(self, msg: dict[str, Any]) -> None:
        if self.alive and not self._input_closed:
            try:
                self._write(msg)
            except MLBridgeError as exc:  # e.g. a result that cannot be encoded
                self._write(
                    {
                        "cb": msg.get("cb"),
                        "success": False,
                        "error": str(exc),
                        "error_type": type(exc).__name__,
                        "error_code": exc.code,
                    }
                )

    def _on_stderr_line(self, line: str) -> None:
        if line.startswith(BOOT_ERROR_MARKER):
            import json

            try:
                self.boot_error = json.loads(line[len(BOOT_ERROR_MARKER) :])
            except ValueError:
                self.boot_error = {"error": line}
            return
        self.stderr_tail.append(line)
        self.logger.debug("[%s] %s", self.worker_id, line)

    def _on_exit(self) -> None:
        assert self.handle is not None
        with self._wlock:  # no caller thread can register a call after this point
            self.returncode = self.handle.poll()
            pending, self.pending = self.pending, {}
        if not self.exited.done():
            self.exited.set_result(self.returncode)
        for p in pending.values():
            # A request still unread in the pipe never reached the worker: safe to retry.
            never_read = self._consumed is not None and p.start >= self._consumed
            error = self.undelivered_error("a call") if never_read else self.crash_error("a call")
            if isinstance(p, SyncPending):
                p.settle(None, error)
                continue
            if not p.future.done():
                p.future.set_exception(error)
            if p.chunks is not None:
                p.chunks.put_nowait(EXITED)
        for task in self.callbacks.values():
            task.cancel()
        if self.on_exit is not None:
            self.on_exit(self)

    # ------------------------------------------------------------------ calls
    def start_sync_request(self, command: str, args: dict[str, Any]) -> tuple[int, SyncPending]:
        """From a caller thread: register and write a call; wait on ``pending.lock``."""
        pending = SyncPending()
        msg: dict[str, Any] = {"id": 0, "command": command, "args": args}
        with self._wlock:
            if not self.alive:
                raise self.undelivered_error(command)
            rid = msg["id"] = next(self._ids)
            self.pending[rid] = pending
            pending.start = self._written
            try:
                self._write_locked(msg)
            except BaseException:
                self.pending.pop(rid, None)
                raise
        return rid, pending

    def timeout_error(self, command: str, timeout: float) -> CallTimeoutError:
        fate = (
            "the worker did not stop, so it was killed and will be replaced"
            if self.doomed
            else "the worker stopped it and stays in the pool"
        )
        return CallTimeoutError(
            f"{self.bridge}:{command} on worker {self.worker_id} ran past its {timeout:g}s "
            f"timeout; {fate}. Raise the call's timeout (or the bridge option 'timeout') if "
            "it is expected to run longer.",
            worker_id=self.worker_id,
        )

    def start_request(
        self,
        command: str,
        args: dict[str, Any],
        *,
        stream: bool = False,
        session_id: str | None = None,
    ) -> tuple[int, Pending]:
        if not self.alive:
            raise self.undelivered_error(command)
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending = Pending(fut, asyncio.Queue() if stream else None, self._written)
        msg: dict[str, Any] = {"id": rid, "command": command, "args": args}
        if stream:
            msg["stream"] = True
        if session_id is not None:
            msg["session_id"] = session_id
        self.pending[rid] = pending
        try:
            self._write(msg)
        except BaseException:
            del self.pending[rid]
            raise
        return rid, pending

    async def request(
        self,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        session_id: str | None = None,
        cancel_grace: float = 1.0,
    ) -> Any:
        """Send one request and return its ``result``; raise the typed error of a failure."""
        rid, pending = self.start_request(command, args or {}, session_id=session_id)
        reply = await self._await_reply(rid, pending, command, timeout, cancel_grace)
        return self._result(reply, command)

    def _result(self, reply: dict[str, Any], command: str) -> Any:
        if reply.get("success"):
            return reply.get("result")
        raise exception_from_failure(Failure.from_wire(reply))

    async def _await_reply(
        self,
        rid: int,
        pending: Pending,
        command: str,
        timeout: float | None,
        cancel_grace: float,
    ) -> dict[str, Any]:
        # Hot path: await the reply future itself with a timer beside it (two loop iterations a
        # call, where wait_for(shield(...)) costs four and three extra objects).
        fut = pending.future
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        if (
            MANY_CPUS
            and ready is not None
            and not ready
            and len(self.pending) == 1
            and _LOOP_CALLS[0] == 0
        ):
            # Nothing else is runnable on this loop: poll the worker's output for a moment
            # instead of sleeping in epoll and paying a wake-up for a reply that is microseconds
            # away. Any other callback becoming ready ends the poll at once.
            deadline = time.perf_counter() + ASYNC_SPIN_S
            while not fut.done() and not ready and time.perf_counter() < deadline:
                if self._out_fd < 0:
                    break
                self._read_stdout()
                os.sched_yield()  # a worker sharing this CPU gets to run and answer
            if fut.done():
                return fut.result()
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, expire, pending)
        _LOOP_CALLS[0] += 1
        try:
            return await fut
        except Expired:
            pass
        except asyncio.CancelledError:
            # The caller gave up (task cancelled): stop the work in the worker too.
            if rid in self.pending and self.alive:
                with contextlib.suppress(MLBridgeError):
                    self._write(
                        {"id": next(self._ids), "command": "cancel", "args": {"target": rid}}
                    )
            raise
        finally:
            _LOOP_CALLS[0] -= 1
            if timer is not None:
                timer.cancel()
        assert timeout is not None
        # Past the deadline: ask the worker to cancel, give it a short grace, then kill it.
        await self.cancel_call(rid, command, cancel_grace)
        raise self.timeout_error(command, timeout)

    def _send_cancel(self, rid: int) -> None:
        self._write({"id": next(self._ids), "command": "cancel", "args": {"target": rid}})

    async def cancel_call(self, rid: int, command: str, grace: float) -> None:
        pending = self.pending.get(rid)
        if pending is None or isinstance(pending, SyncPending):
            return
        fut = pending.future
        with contextlib.suppress(MLBridgeError):
            self._send_cancel(rid)
        try:
            await asyncio.wait_for(asyncio.shield(fut), grace)
            return
        except (TimeoutError, MLBridgeError):
            pass
        self.pending.pop(rid, None)
        if not fut.done():
            fut.cancel()
        self.kill(f"it did not stop {command!r} within {grace:g}s of a cancel")

    async def stream(
        self,
        command: str,
        args: dict[str, Any],
        *,
        timeout: float | None = None,
        session_id: str | None = None,
        cancel_grace: float = 1.0,
        final: list[Any] | None = None,
    ) -> AsyncIterator[Any]:
        """Yield stream chunks; the final result is appended to ``final`` when given."""
        rid, pending = self.start_request(command, args, stream=True, session_id=session_id)
        assert pending.chunks is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        done = False
        try:
            while True:
                get = asyncio.ensure_future(pending.chunks.get())
                waiters: set[asyncio.Future[Any]] = {get, pending.future}
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                finished, _ = await asyncio.wait(
                    waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                if get in finished:
                    item = get.result()
                    if item is EXITED:
                        break
                    yield item
                    continue
                get.cancel()
                if pending.future in finished:
                    while not pending.chunks.empty():
                        item = pending.chunks.get_nowait()
                        if item is not EXITED:
                            yield item
                    done = True
                    result = self._result(pending.future.result(), command)
                    if final is not None:
                        final.append(result)
                    return
                await self.cancel_call(rid, command, cancel_grace)
                raise CallTimeoutError(
                    f"stream {self.bridge}:{command} on worker {self.worker_id} ran past its "
                    f"{timeout:g}s timeout",
                    worker_id=self.worker_id,
                )
            if pending.future.done() and not pending.future.cancelled():
                pending.future.result()  # raises the crash error
            raise self.crash_error(f"stream {command!r}")
        finally:
            if not done and rid in self.pending:
                # The consumer stopped early (break / cancellation): stop the worker too.
                await self.cancel_call(rid, command, cancel_grace)
