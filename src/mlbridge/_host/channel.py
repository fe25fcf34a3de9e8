"""One worker as the host sees it: a backend transport, a sans-I/O connection, the calls in flight.

Theory of operation
-------------------
A :class:`WorkerChannel` is created and driven on the host's event loop thread. It asks a backend
(:mod:`mlbridge._backends`) to start the worker described by a :class:`WorkerSpec` and receives
the transport's events: bytes go into the :class:`~.connection.Connection`, which decodes frames
and calls back ``on_reply`` / ``on_chunk`` / ``on_callback`` ...; stderr goes into a bounded
:class:`~.exits.StderrTail`; the exit fails every call still in flight. Timeouts, cancellation
and streams are the call policy of :mod:`.calls`.

Ownership: the pool decides *who* may send a call on a channel (checkout); the channel
guarantees that each reply reaches the call that waits for it, and that when the worker exits
every pending call fails at once with :class:`WorkerCrashedError` naming the exit, its likely
cause and the stderr tail — or as *undelivered* (safe to run elsewhere) when the backend can
tell that the worker never read the request.

Threads: everything runs on the loop thread except the blocking API's direct path, where a
caller thread registers a :class:`SyncPending` call and writes it (``_wlock`` makes the
registration and the write one step, and no call can be registered once the exit was handled),
then reads the worker's output itself (:mod:`.caller_thread`: held, or polled for a moment);
frames it reads that are not its own reply are handed to the loop in order. A held output it
leaves parked is watched again (``watch_output``) before the loop writes a call of its own.
The writing side (requests, cancels, call-back replies) and a direct call's read of its own
reply are :class:`~.channel_writes.ChannelWrites`, which this class extends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .._backends import Backend, WorkerSpec, WorkerTransport
from .._protocol.codec import MsgpackCodec
from .._protocol.messages import PROTOCOL_VERSION, Failure
from .._protocol.wire_errors import exception_from_failure
from ..errors import WorkerCrashedError
from . import shm_host as shm
from .caller_thread import CallerThreadRouter
from .channel_writes import ChannelWrites
from .connection import Connection
from .exits import ExitInfo, StderrTail, crash_error
from .pending import Pending, SyncPending, fail
from .worker_logs import bridge_log_level

__all__ = ["CallbackHandler", "ExitInfo", "WorkerChannel"]

CallbackHandler = Callable[["WorkerChannel", dict[str, Any]], Coroutine[Any, Any, None]]


class WorkerChannel(ChannelWrites):
    """A live worker: start it, talk to it, watch it die."""

    def __init__(
        self,
        spec: WorkerSpec,
        backend: Backend,
        *,
        on_callback: CallbackHandler | None = None,
        on_exit: Callable[[WorkerChannel], None] | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.spec = spec
        self.bridge = spec.bridge
        self.worker_id = spec.worker_id
        self.backend = backend
        self._callback_handler = on_callback
        self.on_exit = on_exit
        self.logger = logger or logging.getLogger("mlbridge.worker")
        self.conn = Connection(spec.max_frame_bytes)
        self.pending: dict[int, Pending | SyncPending] = {}
        # calls whose caller gave up (cancelled) while the worker still runs them
        self.abandoned: dict[int, Pending] = {}
        self.callbacks: dict[int, asyncio.Task[None]] = {}
        self.deadline_timer: asyncio.TimerHandle | None = None  # calls' timeouts (.calls)
        self.stderr = StderrTail(self._log_stderr)
        self.transport: WorkerTransport | None = None
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wlock = threading.Lock()
        self._caller_router = CallerThreadRouter(self)
        # (id, call) of the caller thread holding the output for its direct call (.direct)
        self.held_call: tuple[int, SyncPending] | None = None
        self.pid: int | None = None
        self.returncode: int | None = None
        self.exited: asyncio.Future[int | None] = self._loop.create_future()
        self.started_at = time.monotonic()
        self.hello: dict[str, Any] = {}
        self.shm: shm.ShmOffload | None = None  # shared-memory payloads (see mlbridge._shm)
        self.closing = False
        self.doomed = False
        self.kill_reason: str | None = None
        self.closing_reason: str | None = None  # set when the host closes the pool
        self._gone = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker through the backend (OSError when it cannot be started)."""
        self.transport = self.backend.start(self.spec, self, self._loop)
        self.pid = self.transport.pid

    async def handshake(
        self, codec: str, timeout: float, *, shm_threshold: int = 0, shm_pool_bytes: int = 0
    ) -> dict[str, Any]:
        """``hello``: protocol version, codec, callbacks, shared memory (offered when
        ``shm_threshold`` > 0). The worker is ready once this returns."""
        args: dict[str, Any] = {
            "protocol_version": PROTOCOL_VERSION,
            "codecs": [codec, "json"],
            "capabilities": ["callbacks", "streaming", "binary"],
        }
        offered = shm.offer(shm_threshold, shm_pool_bytes)
        if offered is not None:
            args["shm"] = offered
        reply = await self.request("hello", args, timeout=timeout)
        self.conn.use_codec(str(reply["codec"]))
        self.shm = shm.accepted(offered, reply)
        if self.shm is not None:
            self.conn.codec = MsgpackCodec(self.shm)
        self.hello = reply
        return dict(reply)

    @property
    def boot_error(self) -> dict[str, Any] | None:
        return self.stderr.boot_error

    @property
    def stderr_tail(self) -> list[str]:
        return list(self.stderr.lines)

    @property
    def running(self) -> bool:
        """The worker has not exited (as far as the loop has noticed)."""
        return not self._gone

    def exit_info(self) -> ExitInfo:
        cause = getattr(self.transport, "exit_cause", None)  # a limit the kernel enforced
        return ExitInfo(
            self.returncode,
            "\n".join(self.stderr.lines),
            self.stderr.boot_error,
            self.kill_reason,
            f"{cause['limit']}={cause['value']}" if cause else None,
        )

    def undelivered_error(self, command: str) -> WorkerCrashedError:
        """The worker was gone before the request reached it (nothing ran: safe to retry)."""
        exc = self.crash_error(f"{command!r} (the request was never delivered)")
        exc.details["undelivered"] = True
        return exc

    def crash_error(self, during: str) -> WorkerCrashedError:
        cause = None if self.kill_reason else getattr(self.transport, "exit_cause", None)
        return crash_error(
            self.bridge,
            self.worker_id,
            self.pid,
            during,
            closing_reason=self.closing_reason,
            limit_cause=cause,  # a limit the kernel enforced, when the backend knows one
            info=self.exit_info(),
            stderr_tail=self.stderr.tail(12),
        )

    def kill(self, reason: str, sig: int = signal.SIGKILL) -> None:
        """Signal the worker and everything it started."""
        if self.kill_reason is None:
            self.kill_reason = reason
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.doomed = True
        if self.transport is not None and not self._gone:
            self.transport.signal(sig)

    def running_commands(self) -> list[str]:
        """The commands in flight, control traffic (heartbeats, cancels) left out."""
        return [
            p.command
            for p in self.pending.values()
            if p.command and p.command not in ("heartbeat", "cancel", "ping")
        ]

    def fail_calls(self, error: BaseException) -> None:
        """Fail every call in flight now with ``error`` (the host is closing)."""
        pending, self.pending = self.pending, {}
        self.abandoned.clear()
        for p in pending.values():
            fail(p, error)

    def close_input(self) -> None:
        if self.transport is not None and not self._gone:
            self.transport.close_input()

    async def close(self, timeout: float) -> None:
        """Close the worker's input (it exits 0), then TERM, then KILL."""
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

    # ------------------------------------------------------------------ transport events
    def data_received(self, data: memoryview) -> None:
        if threading.get_ident() == self._loop_thread:
            self.conn.receive(data, self)
            return
        held = self.held_call
        if held is None:
            self.conn.receive(data, self._caller_router)
            return
        # The caller thread holding the output, reading its own reply: taken here, no settling.
        rid, pending = held
        reply = self.conn.take_reply(data, rid, self._caller_router)
        if reply is not None:
            self.took_reply(rid, pending, reply)

    def stderr_received(self, data: bytes) -> None:
        self.stderr.feed(data)

    def process_exited(self, returncode: int | None, consumed: int | None) -> None:
        self.stderr.flush()
        with self._wlock:  # no caller thread can register a call after this point
            self._gone = True
            self.returncode = returncode
            pending, self.pending = self.pending, {}
            self.abandoned.clear()
        if not self.exited.done():
            self.exited.set_result(returncode)
        for p in pending.values():
            # A request the worker never read did not run: safe to retry elsewhere.
            never_read = consumed is not None and p.start >= consumed
            error = self.undelivered_error("a call") if never_read else self.crash_error("a call")
            fail(p, error)
        for task in self.callbacks.values():
            task.cancel()
        if self.shm is not None:  # what either side wrote and the other never read
            self.shm.close(peer_prefix=self.shm.accept)
        if self.on_exit is not None:
            self.on_exit(self)

    def _log_stderr(self, line: str) -> None:
        # a bridge's own log lines (model-load progress...) keep their level; the rest is DEBUG
        self.logger.log(bridge_log_level(line), "[%s] %s", self.worker_id, line)

    # ------------------------------------------------------------------ connection events
    def on_reply(self, rid: int, msg: dict[str, Any]) -> None:
        pending = self.pending.pop(rid, None)
        if self.abandoned:
            self.abandoned.pop(rid, None)
        self.note_limit(msg)
        if pending is None:
            return  # a reply to a call given up on (timed out, cancelled)
        if isinstance(pending, SyncPending):
            pending.settle(msg)
        elif not pending.future.done():
            pending.future.set_result(msg)

    def on_chunk(self, rid: int, chunk: Any) -> None:
        pending = self.pending.get(rid)
        if isinstance(pending, Pending) and pending.chunks is not None:
            pending.chunks.put_nowait(chunk)

    def on_callback(self, msg: dict[str, Any]) -> None:
        if self._callback_handler is None:
            return
        cb = msg.get("cb")
        task = self._loop.create_task(self._callback_handler(self, msg))
        if isinstance(cb, int):
            self.callbacks[cb] = task
            task.add_done_callback(lambda _t: self.callbacks.pop(cb, None))

    def on_callback_cancel(self, cb: Any) -> None:
        withdrawn = self.callbacks.pop(cb, None) if isinstance(cb, int) else None
        if withdrawn is not None:
            withdrawn.cancel()

    def on_stray(self, msg: Any) -> None:
        if isinstance(msg, dict) and msg.get("success") is False:
            self.logger.error("worker %s protocol failure: %s", self.worker_id, msg.get("error"))
        else:
            self.logger.warning("ignoring a stray frame from %s: %.200r", self.worker_id, msg)

    def on_fatal(self, reason: str) -> None:
        self.logger.error("worker %s: %s; killing it", self.worker_id, reason)
        self.kill(reason)

    @staticmethod
    def result(reply: dict[str, Any]) -> Any:
        """The ``result`` of a success reply; the typed error of a failure."""
        if reply.get("success"):
            return reply.get("result")
        raise exception_from_failure(Failure.from_wire(reply))

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
        from .calls import call

        reply = await call(
            self,
            command,
            args or {},
            timeout=timeout,
            session_id=session_id,
            cancel_grace=cancel_grace,
        )
        return self.result(reply)
