"""The ``socketpair`` backend: a subprocess whose frame stream is one end of a Unix socket pair.

A deliberately different second implementation of the backend seam (``local`` uses pipes, a
pidfd and FIONREAD): here the frames travel over a socket, written with ``send``/``sendmsg``
and read with ``recv_into``; the exit is noticed by a waiter thread blocked in ``wait()``, and the
backend cannot tell how much of its input a dead worker read (``consumed`` is None), so the host
treats every call in flight at a crash as possibly delivered. The backend contract suite runs
against it and ``local``; it is also usable as a bridge's ``backend`` option, and it is the model
for transports that are not pipes (a fork server's socket, a Ray actor's stream).

Theory of operation: the socket and the stderr pipe are watched by the loop; writes that the
socket does not take at once are buffered and drained by a writer callback. ``_lock`` guards the
socket for writers and readers alike (``write`` and ``read_now`` may be called from another
thread). The waiter thread only posts ``_finish`` to the loop, which drains the socket and stderr
and then reports the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import threading
from typing import Any

from . import TransportEvents, WorkerSpec, isolation, worker_command
from ._stderr import StderrPipe

__all__ = ["SocketTransport", "SocketpairBackend"]

_READ_SIZE = 1 << 18


class SocketTransport:
    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        sock: socket.socket,
        events: TransportEvents,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        assert proc.stderr is not None
        self.proc = proc
        self.pid: int | None = proc.pid
        self._sock = sock
        self._events = events
        self._loop = loop
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._written = 0
        self._writer_on = False
        self._input_closed = False
        self._exited = False
        self.plan: isolation.Plan | None = None  # limits and isolation, finished at exit
        self._buf = bytearray(_READ_SIZE)
        self._view = memoryview(self._buf)
        self._err = proc.stderr.fileno()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)
        self._stderr = StderrPipe(self._err, events, loop)
        threading.Thread(target=self._wait, name=f"mlbridge-wait-{proc.pid}", daemon=True).start()

    @property
    def written(self) -> int:
        return self._written

    def write(self, header: bytes, payload: bytes | memoryview) -> None:
        with self._lock:
            if self._input_closed or self._exited:
                raise BrokenPipeError("the worker's socket is closed")
            self._written += len(header) + len(payload)
            if not self._pending:
                try:
                    n = self._sock.sendmsg([header, payload])
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    raise BrokenPipeError(str(exc)) from exc
                total = len(header) + len(payload)
                if n >= total:
                    return
                data = bytes(header) + bytes(payload)
                self._pending += data[n:]
            else:
                self._pending += header
                self._pending += payload
            self._loop.call_soon_threadsafe(self._start_writer)

    def _start_writer(self) -> None:
        if not self._writer_on and not self._exited and self._pending:
            self._writer_on = True
            self._loop.add_writer(self._sock.fileno(), self._drain)

    def _drain(self) -> None:
        with self._lock:
            try:
                n = self._sock.send(self._pending)
            except BlockingIOError:
                return
            except OSError:
                n = len(self._pending)
            del self._pending[:n]
            if self._pending:
                return
            self._loop.remove_writer(self._sock.fileno())
            self._writer_on = False
            if self._input_closed:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)

    def close_input(self) -> None:
        with self._lock:
            if self._input_closed:
                return
            self._input_closed = True
            if not self._pending and not self._exited:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)

    def signal(self, sig: int) -> None:
        if self._exited or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _on_readable(self) -> None:
        if self.read_now() == 0 and not self._exited:
            self._loop.remove_reader(self._sock.fileno())

    def read_now(self) -> int:
        if not self._lock.acquire(blocking=False):
            return -1
        try:
            if self._exited:
                return 0
            try:
                n = self._sock.recv_into(self._buf)
            except BlockingIOError:
                return -1
            except OSError:
                return 0
            if n:
                self._events.data_received(self._view[:n])
            return n
        finally:
            self._lock.release()

    def read_view(self) -> memoryview | int:
        lock = self._lock
        if not lock.acquire(blocking=False):
            return -1
        try:
            n = 0 if self._exited else self._sock.recv_into(self._buf)
        except BlockingIOError:
            n = -1
        except OSError:
            n = 0
        except BaseException:
            lock.release()
            raise
        if n > 0:
            return self._view[:n]  # the output stays locked until end_view()
        lock.release()
        return n

    def end_view(self) -> None:
        self._lock.release()

    def hold_output(self) -> bool:
        return False  # the loop always reads the socket: the direct path's other branch

    def release_output(self, park: bool = False) -> None:
        pass

    def watch_output(self) -> None:
        pass

    def read_wait(self, timeout: float) -> int:
        return self.read_now()

    def _wait(self) -> None:
        self.proc.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if self._exited:
            return
        fd = self._sock.fileno()
        with self._lock:
            while True:
                try:
                    n = self._sock.recv_into(self._buf)
                except OSError:
                    n = 0
                if n <= 0:
                    break
                self._events.data_received(self._view[:n])
            self._exited = True
            self._input_closed = True
            self._pending.clear()
        self._loop.remove_reader(fd)
        if self._writer_on:
            self._loop.remove_writer(fd)
            self._writer_on = False
        self._sock.close()
        self._stderr.finish()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        if self.plan is not None:  # why (a limit?), leftovers killed, cgroups and dirs removed
            self.plan.finish(self.proc.returncode)
        self._events.process_exited(self.proc.returncode, None)

    @property
    def exit_cause(self) -> dict[str, Any] | None:
        """The limit that stopped the worker (``limit``, ``value``, ``fix``), when one did."""
        return None if self.plan is None else self.plan.exit_cause


class SocketpairBackend:
    name = "socketpair"

    def start(
        self, spec: WorkerSpec, events: TransportEvents, loop: asyncio.AbstractEventLoop
    ) -> SocketTransport:
        argv, env = worker_command(spec)
        plan, env = isolation.prepare(spec.isolation, spec.worker_id, env)  # limits, sandbox
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                bufsize=0,
            )
        except BaseException:
            ours.close()
            if plan is not None:
                plan.cleanup_unstarted()
            raise
        finally:
            theirs.close()
        transport = SocketTransport(proc, ours, events, loop)
        if plan is not None:
            plan.started(proc.pid)
        transport.plan = plan
        return transport
