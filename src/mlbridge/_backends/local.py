"""The ``local`` backend: each worker is a subprocess of the host, talking over pipes.

Theory of operation
-------------------
:class:`PipeTransport` is created on the host's loop thread and its fds are watched by that loop
with ``add_reader`` (stderr, a pidfd that becomes readable at exit — without a pidfd the exit is
polled — and stdout through an epoll set of its own, see below). Writes go straight to the pipe
with ``os.write`` and are buffered only when the pipe is full (drained by a writer callback),
and reads land in one reusable buffer: the hot path has no asyncio transport or protocol objects
in between, which matters at microseconds per call. The worker runs in its own session (process
group), so terminal signals stay away from it and :meth:`PipeTransport.signal` reaches
everything it started.

Held output: the loop watches stdout through a one-fd epoll set owned by the transport (the
loop sees the set's fd, readable exactly when stdout is; no extra system call per read). A
caller thread about to make a blocking call can :meth:`hold_output`: the set's interest is
cleared with ``epoll_ctl`` (safe from any thread, unlike the loop's own selector), so the reply
wakes only that caller, blocked in ``poll`` on stdout in :meth:`read_wait`, and never the loop
thread — on a busy or single CPU that saves a thread wake-up, a loop iteration and a hand-over
per call. :meth:`release_output` restores the interest (level-triggered: anything left unread
wakes the loop at once). While held, the loop's reader does not read even if it was already
woken; it checks ``_held`` under ``_rlock``, which :meth:`hold_output` takes once after setting
it, so no read the loop began earlier can swallow the caller's reply.

Parked output: a caller whose call is over while nothing else awaits output (the host decides)
may ``release_output(park=True)``: the interest stays cleared, so the next blocking call holds
the output without a system call, and a worker that is silent until asked costs the loop
nothing. The loop calls :meth:`watch_output` before it writes a request of its own, which
restores the interest if the output is parked. ``_hold_lock`` makes parking, holding and
watching exclusive, with one exception: output parked and unwatched is held, and parked again,
without the lock (every blocking call does both; ``_interest`` says whether the set watches
stdout, so a park never leaves it watched). The worker's exit is seen through the pidfd either
way, and :meth:`_finish` drains the pipe whatever the interest.

Locks: ``_wlock`` guards the input side (``write`` may be called from a caller thread on the
blocking API's direct path); ``_rlock`` guards the output fd and the read buffer, because
:meth:`read_now` may read from a caller thread while the loop's reader callback runs. At exit the
transport drains what the worker left in its pipes, measures how much of its input it never read
(FIONREAD), releases every fd, and only then reports ``process_exited``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import struct
import subprocess
import threading
from typing import Any

from . import TransportEvents, WorkerSpec, isolation, worker_command
from ._stderr import StderrPipe

__all__ = ["LocalBackend", "PipeTransport", "unread_bytes"]

PIPE_BYTES = 1 << 20
_READ_SIZE = 1 << 20


class PipeTransport:
    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        events: TransportEvents,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.proc = proc
        self.pid: int | None = proc.pid
        self._events = events
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._in = proc.stdin.fileno()
        self._out = proc.stdout.fileno()
        self._err = proc.stderr.fileno()
        for fd in (self._in, self._out):
            os.set_blocking(fd, False)
        _grow_pipe(self._in)
        _grow_pipe(self._out)
        self._wlock = threading.Lock()
        self._rlock = threading.Lock()
        self._wbuf = bytearray()  # bytes the pipe would not take yet
        self.written = 0  # bytes handed to write() (a plain attribute: read on every call)
        self._writer_on = False
        self._input_closed = False
        self._close_after_drain = False
        self._exited = False
        self._rbuf = bytearray(_READ_SIZE)
        self._rview = memoryview(self._rbuf)
        self._held = False
        self._parked = False  # held with no holder (see "Parked output" above)
        self._interest = True  # the watch set has EPOLLIN for stdout (changed in _set_interest)
        self._hold_lock = threading.Lock()
        self._watch = select.epoll()  # holds stdout only; the loop watches this set's fd
        self._watch.register(self._out, select.EPOLLIN)
        self._poller = select.poll()  # a holding caller thread waits here
        self._poller.register(self._out, select.POLLIN)
        loop.add_reader(self._watch.fileno(), self._on_readable)
        self._stderr = StderrPipe(self._err, events, loop)
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except (OSError, AttributeError):
            self._pidfd = -1
        self._poll: asyncio.TimerHandle | None = None
        self.plan: isolation.Plan | None = None  # limits and isolation, finished at exit
        if self._pidfd >= 0:
            loop.add_reader(self._pidfd, self._on_pidfd)
        else:  # no pidfd (old kernel): notice the exit by polling
            self._poll = loop.call_later(0.05, self._poll_exit)

    # ------------------------------------------------------------------ input
    def write(self, header: bytes, payload: bytes | memoryview) -> None:
        with self._wlock:
            if self._input_closed or self._exited:
                raise BrokenPipeError("the worker's input is closed")
            self.written += len(header) + len(payload)
            if self._wbuf:
                self._wbuf += header
                self._wbuf += payload
                return
            total = len(header) + len(payload)
            try:
                if len(payload) < 65536:
                    data = header + payload
                    n = os.write(self._in, data)
                    if n < total:
                        self._buffer(memoryview(data)[n:])
                else:
                    n = os.writev(self._in, (header, payload))
                    if n < total:
                        if n < len(header):
                            self._wbuf += header[n:]
                        self._buffer(memoryview(payload)[max(0, n - len(header)) :])
            except BlockingIOError:
                self._wbuf += header
                self._buffer(memoryview(payload))

    def _buffer(self, rest: memoryview) -> None:
        self._wbuf += rest
        if threading.get_ident() == self._loop_thread:
            self._start_writer()
        else:
            self._loop.call_soon_threadsafe(self._start_writer)

    def _start_writer(self) -> None:
        if not self._writer_on and self._in >= 0 and self._wbuf:
            self._writer_on = True
            self._loop.add_writer(self._in, self._drain)

    def _drain(self) -> None:
        with self._wlock:
            try:
                n = os.write(self._in, self._wbuf)
            except BlockingIOError:
                return
            except OSError:
                n = len(self._wbuf)  # the worker is gone; its exit is handled elsewhere
            del self._wbuf[:n]
            if self._wbuf:
                return
            self._loop.remove_writer(self._in)
            self._writer_on = False
        if self._close_after_drain:
            self._close_in()

    def close_input(self) -> None:
        with self._wlock:
            if self._input_closed:
                return
            self._input_closed = True
            if self._wbuf and not self._exited:
                self._close_after_drain = True
                return
        self._close_in()

    def _close_in(self) -> None:
        if self._in >= 0:
            if self._writer_on:
                self._loop.remove_writer(self._in)
                self._writer_on = False
            self._wbuf.clear()
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            self._in = -1

    def signal(self, sig: int) -> None:
        if self.proc.returncode is not None or self._exited:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    # ------------------------------------------------------------------ output
    def _on_readable(self) -> None:
        if not self._rlock.acquire(blocking=False):
            return  # a caller thread is reading
        try:
            n = -1 if self._held or self._parked else self._read()
        finally:
            self._rlock.release()
        if n == 0:
            self._unwatch()

    def read_now(self) -> int:
        rlock = self._rlock
        if not rlock.acquire(blocking=False):
            return -1
        try:
            return self._read()
        finally:
            rlock.release()

    def _read(self) -> int:  # under _rlock
        if self._out < 0:
            return 0
        try:
            n = os.readv(self._out, [self._rbuf])
        except BlockingIOError:
            return -1
        except OSError:
            return 0
        if n:
            self._events.data_received(self._rview[:n])
        return n

    def read_view(self) -> memoryview | int:
        rlock = self._rlock
        if not rlock.acquire(blocking=False):
            return -1
        try:
            n = os.readv(self._out, [self._rbuf]) if self._out >= 0 else 0
        except BlockingIOError:
            n = -1
        except OSError:
            n = 0
        except BaseException:
            rlock.release()
            raise
        if n > 0:
            return self._rview[:n]  # the output stays locked until end_view()
        rlock.release()
        return n

    def end_view(self) -> None:
        self._rlock.release()

    def hold_output(self) -> bool:
        if self._parked and not self._interest:
            # Parked and unwatched since the last holder: hold it as it is, without the lock
            # (a watch_output() racing this either sees it held, or watches first and we
            # hold with the interest on: the loop then skips reading until release).
            self._parked = False
            self._held = True
            return True
        with self._hold_lock:
            if self._parked:  # the interest has stayed cleared since the last holder's hold
                self._parked = False
                if self._watch.closed:  # the output ended meanwhile: nothing to hold
                    return False
                self._held = True
                return True
            self._held = True
            if not self._set_interest(False):  # the worker is gone and the set closed
                self._held = False
                return False
        with self._rlock:  # a read the loop began before the hold is over once this returns
            pass
        return True

    def release_output(self, park: bool = False) -> None:
        if park and not self._interest:
            # The interest is still cleared: park as it is, without the lock. (Our callers
            # hold the channel's write lock, as watch_output()'s do, so none races this.)
            self._held = False
            self._parked = True
            return
        with self._hold_lock:
            self._held = False
            if park:
                self._set_interest(False)
                self._parked = True
                return
            self._set_interest(True)

    def watch_output(self) -> None:
        if not self._parked:
            return
        with self._hold_lock:
            if self._parked:
                self._parked = False
                self._set_interest(True)

    def _set_interest(self, on: bool) -> bool:
        """Under ``_hold_lock``: the loop watches stdout (``on``) or not; False once the
        set is closed (the output ended)."""
        if self._interest == on:
            return not self._watch.closed
        try:
            self._watch.modify(self._out, select.EPOLLIN if on else 0)
        except (OSError, ValueError):
            return False
        self._interest = on
        return True

    def read_wait(self, timeout: float) -> int:
        try:
            ready = self._poller.poll(max(0, int(timeout * 1000 + 0.999)))
        except (OSError, ValueError):
            ready = [(-1, 0)]
        if not ready:
            return -1
        with self._rlock:
            return self._read()

    def _unwatch(self) -> None:
        if not self._watch.closed:
            self._loop.remove_reader(self._watch.fileno())
            self._watch.close()

    # ------------------------------------------------------------------ exit
    def _on_pidfd(self) -> None:
        if self.proc.poll() is not None:
            self._finish()

    def _poll_exit(self) -> None:
        if self.proc.poll() is None:
            self._poll = self._loop.call_later(0.05, self._poll_exit)
        else:
            self._finish()

    def _finish(self) -> None:
        """Drain what the worker left, count what it never read, release fds, then report."""
        if self._exited:
            return
        loop = self._loop
        if self._pidfd >= 0:
            loop.remove_reader(self._pidfd)
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = -1
        with self._rlock:
            while self._out >= 0:
                try:
                    n = os.readv(self._out, [self._rbuf])
                except OSError:
                    n = 0
                if n <= 0:
                    break
                self._events.data_received(self._rview[:n])
            self._unwatch()
            self._out = -1
        self._stderr.finish()
        with self._wlock:
            consumed = self.written - len(self._wbuf) - unread_bytes(self._in)
            self._exited = True
            self._input_closed = True
        self._close_in()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        if self.plan is not None:  # why (a limit?), leftovers killed, cgroups and dirs removed
            self.plan.finish(self.proc.returncode)
        self._events.process_exited(self.proc.returncode, consumed)

    @property
    def exit_cause(self) -> dict[str, Any] | None:
        """The limit that stopped the worker (``limit``, ``value``, ``fix``), when one did."""
        return None if self.plan is None else self.plan.exit_cause

    @property
    def isolation_report(self) -> dict[str, Any] | None:
        return None if self.plan is None else self.plan.report()


class LocalBackend:
    name = "local"

    def start(
        self, spec: WorkerSpec, events: TransportEvents, loop: asyncio.AbstractEventLoop
    ) -> PipeTransport:
        argv, env = worker_command(spec)
        plan, env = isolation.prepare(spec.isolation, spec.worker_id, env)  # limits, sandbox
        # A fork+exec blocks the loop for about a millisecond: cheaper than asyncio's
        # subprocess machinery would cost on every frame afterwards.
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
                bufsize=0,
            )
        except BaseException:
            if plan is not None:
                plan.cleanup_unstarted()
            raise
        if plan is not None:
            plan.started(proc.pid)
        transport = PipeTransport(proc, events, loop)
        transport.plan = plan
        return transport


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (OSError, ValueError):
        pass


def unread_bytes(fd: int) -> int:
    """Bytes still waiting in a pipe (FIONREAD works on either end on Linux); 0 if unknown."""
    if fd < 0:
        return 0
    try:
        import fcntl
        import termios

        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except (OSError, ImportError):
        return 0
