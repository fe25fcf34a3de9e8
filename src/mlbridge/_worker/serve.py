"""The worker's serve loop: a main thread that works (and reads while idle), a control thread.

Theory of operation
-------------------
Owners:
* The **main thread** owns the bridge. It runs handlers one at a time, in arrival order, and
  writes their replies (or stream chunks then the reply). Frameworks that insist on the main
  thread (signals, some C libraries) are happy.
* The **input pipe and the frame decoder** belong to whoever holds the *reader baton* (a lock).
  While the main thread has nothing to run it holds the baton and blocks in ``read`` itself, so a
  request goes from the pipe to its handler without waking another thread: the round trip costs
  one wake-up, like a bare echo loop.
* The **control thread** takes the baton only when the main thread has not come back to read for
  a tick (``CONTROL_TICK_S``: it is running something long, or working through a backlog), or
  at once when a handler waits on a call back to the host. Holding it, the control thread reads
  and answers at once what must not wait: ``hello``, ``ping``/``heartbeat``, ``cancel``, protocol
  failures; callback replies go to the :class:`HostClient`; other requests join the work queue.
  When the main thread runs out of work it asks for the baton back through a wake-up pipe.
  After a long idle spell the control thread parks, and the main thread wakes it when it leaves
  its read; so an idle worker costs no CPU.

Whoever reads handles a frame the same way (a plain ``{"id", "command", "args"}`` request for a
main-thread command is recognised without building a parsed request, the per-call fast path):
undecodable frames -> an unreadable-id failure (id 0
on the v1 wire, ``"id": null, "unreadable": true`` after hello), bad requests -> failure with
their id, oversized frames -> an unreadable-id failure (the decoder skips them).

Invariants: every request that parses gets exactly one final reply with its id; a reply or stream
chunk that would exceed ``max_frame_bytes`` is never written (the host would refuse it and kill
the worker): the call fails instead, saying the size, the limit and the fix, and the worker serves
on. A cancelled
request gets a ``cancelled`` failure (queued ones without running). At end of input the worker
exits 0 within a second: queued work drains for half of that, then everything is cancelled, and
if a handler ignores cancellation the process leaves anyway. SIGTERM/SIGINT handlers only set a
flag, cancel, and enqueue the stop marker (and interrupt the main thread's idle read); cleanup
runs on the main thread.
"""

from __future__ import annotations

import collections
import os
import select
import signal
import sys
import threading
import time
import types
from typing import Any

from .._protocol.codec import MsgpackCodec, get_codec
from .._protocol.exit_codes import EXIT_OK, EXIT_RESOURCE_LIMIT
from .._protocol.framing import OversizedFrame
from .._protocol.messages import (
    PROTOCOL_VERSION,
    MessageError,
    parse_request,
    timestamp,
)
from .._protocol.wire_errors import failure_from_exception
from .._shm import ShmOffload, shm_available, valid_prefix
from ..bridges.base import BaseBridge, CallContext, Handler
from ..errors import CancelledCallError, DecodeError, FrameTooLargeError, InvalidRequestError
from .host_client import HostClient
from .isolate import limit_error
from .transport import HostGoneError, Transport

__all__ = ["CAPABILITIES", "Server"]

CAPABILITIES = (
    "streaming",
    "cancel",
    "heartbeat",
    "callbacks",
    "binary",
    "resource_states",
    "bridge_state",
)
EOF_DRAIN_S = 0.5
EOF_CANCEL_S = 0.3
# The control thread takes over reading when the main thread has not read for one to two ticks,
# so ping/heartbeat/cancel wait at most ~2 ticks behind a long call.
CONTROL_TICK_S = 0.01
# See Server._spin_for_input. No polling when this process may use only one CPU: there the
# caller could not run while we poll, and a blocking read hands it the CPU at once.
SPIN_S = 100e-6 if len(getattr(os, "sched_getaffinity", lambda _: {0, 1})(0)) > 1 else 0.0
CONTROL_PARK_TICKS = 100  # ~1 s of an idle main thread, then the control thread parks
_STOP = None
_clock = time.perf_counter
_GeneratorType = types.GeneratorType


def _parse_hello(args: dict[str, Any]) -> tuple[str, int, set[str]]:
    """Validate ``hello`` args: ``(codec, protocol_version, host capabilities)``."""
    wanted = args.get("codecs")
    if wanted is None:
        wanted = [args["codec"]] if "codec" in args else ["json"]
    if not isinstance(wanted, list) or not all(isinstance(c, str) for c in wanted):
        raise InvalidRequestError(
            f"hello: 'codecs' must be a list of codec names such as ['msgpack'], got {wanted!r}"
        )
    chosen = next((c for c in wanted if c in ("msgpack", "json")), None)
    if chosen is None:
        raise InvalidRequestError(f"hello: no supported codec in {wanted!r}; use msgpack or json")
    version = args.get("protocol_version", PROTOCOL_VERSION)
    if type(version) is not int or version < 1:
        raise InvalidRequestError(
            f"hello: 'protocol_version' must be an integer >= 1, got {version!r}"
        )
    caps = args.get("capabilities") or []
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise InvalidRequestError(f"hello: 'capabilities' must be a list of names, got {caps!r}")
    return chosen, min(version, PROTOCOL_VERSION), set(caps)


def _accept_shm(offer: Any, codec: str) -> ShmOffload | None:
    """The host's shared-memory offer from ``hello`` (``{"prefix", "threshold"}``), taken when
    the codec is MessagePack and ``/dev/shm`` is writable; None otherwise."""
    if not isinstance(offer, dict) or codec != "msgpack":
        return None
    prefix, threshold = offer.get("prefix"), offer.get("threshold")
    pool = offer.get("pool_bytes", 0)
    if (
        not valid_prefix(prefix)
        or isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or threshold < 1
        or not shm_available()
    ):
        return None
    assert isinstance(prefix, str)
    pool = pool if type(pool) is int and pool > 0 else 0
    return ShmOffload(f"{prefix}w{os.getpid()}-", prefix, threshold, pool)


class _StopRequestedError(Exception):
    """Raised by the signal handler into the main thread's idle read (never into a handler)."""


class Server:
    def __init__(self, bridge: BaseBridge, transport: Transport) -> None:
        self.bridge = bridge
        self.transport = transport
        self.v2 = False
        # (call, args, handler) in arrival order; None is the stop marker
        self.work: collections.deque[tuple[CallContext, dict[str, Any], Handler] | None] = (
            collections.deque()
        )
        self.pending: dict[int, CallContext] = {}
        self.stopping = threading.Event()
        self._stop = False  # stopping, as a plain flag for the per-request checks
        self.main_done = threading.Event()
        self.host = HostClient(
            transport, current_call=lambda: bridge._call, want_reader=self.want_reader
        )
        bridge.host = self.host
        self.with_traceback = True
        self.eof = False
        self.shm: ShmOffload | None = None  # shared-memory payloads, when hello agreed on them
        # The reader baton and the hand-back machinery (see the module docstring).
        self._baton = threading.Lock()
        self._want_baton = False  # the main thread waits for the control thread to give it
        self._wake_r, self._wake_w = os.pipe()
        self._read_epoch = 0  # bumped each time the main thread goes back to reading
        self._tick = threading.Event()  # wakes the control thread early
        self._reader_wanted = False
        self._control_parked = False
        self._interruptible = False  # the main thread is in its idle read: a signal may raise
        self._input_poll = select.poll()
        self._input_poll.register(transport.in_fd, select.POLLIN)
        self._binary = False  # the codec carries binary (JSON until hello; CallContext.binary)
        # A bridge class that keeps BaseBridge.dispatch is run without the call through it.
        self._own_dispatch = type(bridge).dispatch is BaseBridge.dispatch

    # ------------------------------------------------------------------ frames (either thread)
    def _handle(self, frames: list[bytes | OversizedFrame]) -> None:
        for frame in frames:
            try:
                if type(frame) is bytes:
                    self._on_frame(frame)
                else:
                    self._refuse_oversized(frame)  # type: ignore[arg-type]
            except HostGoneError:
                raise
            except Exception as exc:
                # A bug (ours or a bridge's control handler) must not stop the reading: report
                # it as an unreadable-id failure and keep serving.
                self._send_unreadable(exc, with_tb=True)

    def _refuse_oversized(self, frame: OversizedFrame) -> None:
        exc = FrameTooLargeError(
            f"frame of {frame.length} bytes refused: the limit is {frame.limit} bytes "
            "(max_frame_bytes). Send large arrays in pieces, or raise the limit on both sides.",
        )
        self._send_unreadable(exc)

    def _on_frame(
        self, frame: bytes, now: bool = False
    ) -> tuple[CallContext, dict[str, Any], Handler] | None:
        """Handle one frame. ``now`` (the main thread, nothing queued): a plain request is
        returned to be run at once instead of queued."""
        try:
            msg = self.transport.decode_raw(frame)
        except Exception:  # the codec's own decode says why, as a DecodeError
            try:
                msg = self.transport.codec.decode(frame)
            except DecodeError as exc:
                self._send_unreadable(exc)
                return None
        if type(msg) is dict:
            if len(msg) == 3:
                # The common request, ``{"id", "command", "args"}`` for a main-thread command
                # of this bridge without a namespace: what parse_request and resolve would
                # accept and find, checked without them.
                rid = msg.get("id")
                command = msg.get("command")
                args = msg.get("args")
                if type(rid) is int and rid >= 0 and type(args) is dict and type(command) is str:
                    bridge = self.bridge
                    handler = bridge._handlers.get(command)
                    if (
                        handler is not None
                        and command not in bridge._control_handlers
                        and command != "hello"
                        and command != "cancel"
                    ):
                        ctx = CallContext(rid, command)
                        if not self._binary:
                            ctx.binary = False
                        self.pending[rid] = ctx
                        if now:
                            return ctx, args, handler
                        self.work.append((ctx, args, handler))
                        return None
            if "cb" in msg and "command" not in msg:
                self.host.deliver(msg)
                return None
        try:
            req = parse_request(msg)
        except MessageError as exc:
            rid = msg.get("id") if type(msg) is dict else None
            if type(rid) is int and rid >= 0:
                self._send_failure(rid, InvalidRequestError(str(exc)), with_tb=False)
            else:
                self._send_unreadable(InvalidRequestError(str(exc)))
            return None
        command = base = req.command
        if ":" in command:
            ns, _, base = command.partition(":")
            if ns != "common" and ns != self.bridge.name:
                base = ""  # not hello/cancel: resolve() refuses the namespace, naming it
        if base == "hello":
            self._hello(req.id, req.args)
            return None
        if base == "cancel":
            self._cancel(req.id, req.args)
            return None
        try:
            handler, control = self.bridge.resolve(command)
        except Exception as exc:  # unknown command/namespace -> failure reply
            self._send_failure(req.id, exc, with_tb=False)
            return None
        if control:
            try:
                result = handler(req.args)
            except Exception as exc:
                self._send_failure(req.id, exc)
                return None
            self._send_success(req.id, result, None, command)
            return None
        ctx = CallContext(req.id, command, req.session_id, req.stream)
        if req.context is not None:
            ctx.trace_context = req.context
        if not self._binary:
            ctx.binary = False
        self.pending[req.id] = ctx
        self.work.append((ctx, req.args, handler))
        return None

    def _hello(self, rid: int, args: dict[str, Any]) -> None:
        try:
            chosen, version, caps = _parse_hello(args)
        except InvalidRequestError as exc:
            self._send_failure(rid, exc, with_tb=False)
            return
        reply = {
            "protocol_version": version,
            "codec": chosen,
            "bridge": self.bridge.name,
            "framework": self.bridge.get_framework_info(),
            "worker_id": self.bridge.worker_id,
            "pid": os.getpid(),
            "capabilities": list(CAPABILITIES),
            "cacheable": self.bridge.cacheable(),
            "max_frame_bytes": self.transport.decoder.max_frame_bytes,
        }
        self.shm = _accept_shm(args.get("shm"), chosen)
        if self.shm is not None:
            reply["shm"] = True
            reply["shm_pool"] = self.shm.pool is not None  # (a host without pools ignores it)
        self._send_success(rid, reply, None)
        self.transport.switch_codec(
            MsgpackCodec(self.shm) if self.shm is not None else get_codec(chosen)
        )
        self._binary = chosen == "msgpack"
        self.v2 = version >= 2
        self.host.enabled = self.v2 and "callbacks" in caps
        self.with_traceback = args.get("tracebacks", True) is not False

    def _cancel(self, rid: int, args: dict[str, Any]) -> None:
        target = args.get("target")
        ctx = self.pending.get(target) if isinstance(target, int) else None
        if ctx is None:
            self._send_success(
                rid,
                {"cancelled": False, "target": target, "reason": "no such call in flight"},
                None,
            )
            return
        # The answer first: the cancelled call's own (cancelled) reply always comes after it.
        self._send_success(rid, {"cancelled": True, "target": target}, None)
        ctx.cancel()

    # ------------------------------------------------------------------ control thread
    def want_reader(self) -> None:
        """Have the control thread read now (a handler is about to wait on the host)."""
        self._reader_wanted = True
        self._tick.set()

    def control(self) -> None:
        """The control thread: take the baton whenever the main thread stays away from reading."""
        seen_epoch = -1
        idle_ticks = 0
        try:
            while not (self.eof or self.main_done.is_set()):
                if self.stopping.is_set():
                    self._cancel_all()  # wakes handlers waiting on cancel_event
                epoch = self._read_epoch
                stalled = epoch == seen_epoch and not self._baton.locked()
                seen_epoch = epoch
                if (
                    (stalled or self._reader_wanted)
                    and not self._want_baton  # never snatch it back from a waiting main thread
                    and self._baton.acquire(blocking=False)
                ):
                    idle_ticks = 0
                    try:
                        self._reader_wanted = False
                        self._read_while_main_busy()
                    finally:
                        self._baton.release()
                    continue
                if self._baton.locked():
                    # The main thread is idle in its read: it will read any reply itself.
                    self._reader_wanted = False
                    idle_ticks += 1
                else:
                    idle_ticks = 0
                if idle_ticks >= CONTROL_PARK_TICKS:
                    self._park()
                    idle_ticks = 0
                    seen_epoch = -1  # a stall is a whole tick without a read, counted afresh
                    continue
                self._tick.wait(CONTROL_TICK_S)
                self._tick.clear()
        except HostGoneError:
            self.eof = True
        except Exception as exc:
            sys.stderr.write(f"mlbridge worker: control thread failed: {exc!r}\n")
            self.eof = True
        if self.eof and not self.main_done.is_set():
            self._on_eof()

    def _park(self) -> None:
        """Sleep until the main thread leaves its read (it sets ``_tick``), without ticking."""
        self._control_parked = True
        try:
            # Checked after raising the flag: the main thread sets _tick after releasing the
            # baton only if it sees the flag, so one of the two always notices the other.
            if self._baton.locked():
                self._tick.wait()
        finally:
            self._control_parked = False
            self._tick.clear()

    def _read_while_main_busy(self) -> None:
        fd, wake = self.transport.in_fd, self._wake_r
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake, select.POLLIN)
        while True:
            for which, _ in poller.poll():
                if which == wake:
                    os.read(wake, 512)
                    if self.stopping.is_set():
                        self._cancel_all()
                    continue
                frames = self.transport.read_some()
                if frames is None:
                    self.eof = True
                    return
                self._handle(frames)
            if self._want_baton or self.main_done.is_set():
                return

    def _cancel_all(self) -> None:
        for ctx in list(self.pending.values()):
            ctx.cancel()

    def _on_eof(self) -> None:
        self.host.close("the host closed the connection")
        self.work.append(_STOP)
        if self.main_done.wait(EOF_DRAIN_S):
            return
        self._cancel_all()
        if self.main_done.wait(EOF_CANCEL_S):
            return
        # A handler ignored cancellation; the host is gone, so leave without it.
        sys.stderr.flush()
        os._exit(EXIT_OK)

    # ------------------------------------------------------------------ main thread
    def serve_forever(self) -> int:
        self._install_signals()
        control = threading.Thread(target=self.control, name="mlbridge-control", daemon=True)
        control.start()
        bridge = self.bridge
        work = self.work
        try:
            while not self._stop:
                if not work:
                    if self.eof:
                        break
                    self._read_as_main()
                    continue
                item = work.popleft()  # only this thread pops: a non-empty deque stays so
                if item is _STOP:
                    break
                self._run_item(*item)
                # Drop the call now, not at the next one: a received shared-memory array is
                # released to its pool as soon as the reply is out (see mlbridge._shm_views).
                del item
            self._refuse_queued("the worker is shutting down")
        except (HostGoneError, _StopRequestedError):
            pass
        finally:
            self._interruptible = False
            self.host.close("the worker is shutting down")
            bridge.shutdown()
            if self.shm is not None:
                self.shm.close()  # what it wrote and the host never read
            self.main_done.set()
            self._tick.set()
        return EXIT_OK

    def _read_as_main(self) -> None:
        """Take the baton (asking the control thread for it if needed), read once, handle."""
        baton = self._baton
        item = None
        self._interruptible = True
        if not baton.acquire(blocking=False):
            self._want_baton = True
            os.write(self._wake_w, b"!")
            baton.acquire()
            self._want_baton = False
        try:
            self._read_epoch += 1
            if self.work or self.eof or self._stop:
                return  # the control thread queued work, or saw the end, meanwhile
            if SPIN_S:
                self._spin_for_input()
            frames = self.transport.read_some()
            self._interruptible = False
            if frames is None:
                self.eof = True
                self.host.close("the host closed the connection")
                return
            if len(frames) == 1 and type(frames[0]) is bytes:
                # One request, nothing queued (the usual call): run it at once, no queue.
                try:
                    item = self._on_frame(frames[0], now=True)
                except HostGoneError:
                    raise
                except Exception as exc:  # as _handle: report it, keep serving
                    self._send_unreadable(exc, with_tb=True)
            else:
                self._handle(frames)
        finally:
            self._interruptible = False
            baton.release()
            if self._control_parked:
                self._tick.set()
        if item is not None:
            self._run_item(*item)

    def _spin_for_input(self) -> None:
        """Poll the input for a moment before blocking in ``read``.

        A caller that sends its next request within ``SPIN_S`` of our reply finds this thread
        still on a CPU: waking a sleeping thread on another CPU costs tens of microseconds on
        virtual machines, more than the whole round trip. Idle workers only pay ``SPIN_S`` of
        CPU each time they go idle.
        """
        if not SPIN_S:
            return
        poll = self._input_poll.poll
        deadline = time.perf_counter() + SPIN_S
        yield_cpu = os.sched_yield
        while not poll(0):
            if time.perf_counter() >= deadline:
                return
            yield_cpu()  # let the caller run here if it was woken on this CPU

    def _run_item(self, ctx: CallContext, args: dict[str, Any], handler: Handler) -> None:
        """Main thread: run one request (or refuse it, cancelled before it ran)."""
        rid = ctx.id
        if ctx.cancelled:
            self.pending.pop(rid, None)
            self._send_failure(rid, CancelledCallError(f"call {rid} was cancelled before it ran"))
            return
        self._run(self.bridge, ctx, args, handler)
        self.pending.pop(rid, None)

    def _refuse_queued(self, why: str) -> None:
        while True:
            try:
                item = self.work.popleft()
            except IndexError:
                return
            if item is None:
                continue
            rid = item[0].id
            self.pending.pop(rid, None)
            self._send_failure(rid, CancelledCallError(f"call {rid} not run: {why}"))

    def _run(
        self, bridge: BaseBridge, ctx: CallContext, args: dict[str, Any], handler: Handler
    ) -> None:
        t0 = _clock()
        try:
            if self._own_dispatch:  # BaseBridge.dispatch, inlined
                bridge._call = ctx
                try:
                    result = handler(args)
                finally:
                    bridge._call = None
            else:
                result = bridge.dispatch(ctx, args, handler)
            if type(result) is _GeneratorType:
                result = self._drain(bridge, result, ctx)
        except Exception as exc:
            bridge.record(ctx.command, _clock() - t0, False)
            limited = limit_error(exc)  # a call that hit max_memory, max_processes...
            self._send_failure(ctx.id, limited or exc)
            if limited is not None:  # its state is suspect: stop, the pool replaces this worker
                sys.stderr.write(f"mlbridge worker: {limited}\n")
                sys.stderr.flush()
                os._exit(EXIT_RESOURCE_LIMIT)
            return
        bridge.record(ctx.command, _clock() - t0, True)
        msg = {"id": ctx.id, "success": True, "result": result, "timestamp": timestamp()}
        if self.v2 and ctx.changed_state:
            if ctx.resource_states:
                msg["resource_states"] = ctx.resource_states
            if ctx.bridge_state:
                msg["bridge_state"] = ctx.bridge_state
        self.transport.send_reply(msg, ctx.command)

    def _drain(
        self, bridge: BaseBridge, gen: types.GeneratorType[Any, Any, Any], ctx: CallContext
    ) -> Any:
        bridge._call = ctx  # generators run their body lazily, after dispatch returned
        send = self.transport.send
        collected: list[Any] = []
        try:
            while True:
                if ctx.cancelled:
                    gen.close()
                    raise CancelledCallError(f"call {ctx.id} ({ctx.command}) was cancelled")
                try:
                    item = next(gen)
                except StopIteration as stop:
                    if ctx.stream:
                        return stop.value if stop.value is not None else {"chunks": len(collected)}
                    return collected
                if ctx.stream:
                    send({"id": ctx.id, "chunk": item})
                    collected.append(None)
                else:
                    collected.append(item)
        finally:
            bridge._call = None

    # ------------------------------------------------------------------ replies
    def _send_success(
        self, rid: int, result: Any, extra: dict[str, Any] | None, command: str | None = None
    ) -> None:
        msg = {"id": rid, "success": True, "result": result, "timestamp": timestamp()}
        if extra:
            msg.update(extra)
        self.transport.send_reply(msg, command)

    def _send_unreadable(self, exc: BaseException, *, with_tb: bool = False) -> None:
        """A failure for a frame whose request id could not be read (see messages.Failure)."""
        failure = failure_from_exception(0, exc, with_traceback=with_tb and self.with_traceback)
        failure.unreadable = self.v2
        self.transport.send_reply(failure.to_wire())

    def _send_failure(self, rid: int, exc: BaseException, *, with_tb: bool = True) -> None:
        failure = failure_from_exception(rid, exc, with_traceback=with_tb and self.with_traceback)
        self.transport.send_reply(failure.to_wire())

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        def on_signal(signum: int, frame: Any) -> None:
            # Runs on the main thread between two bytecodes, possibly while the main thread
            # holds a lock (a Condition inside an Event, the cancel lock): so take none here.
            # Plain flags, a deque append and a pipe write; the control thread does the rest.
            self._stop = True
            self.stopping.set()  # the main thread never holds this Event's lock
            for ctx in list(self.pending.values()):
                ctx._cancelled = True
            self.work.append(_STOP)
            try:
                os.write(self._wake_w, b"s")
            except OSError:
                pass
            if self._interruptible:
                # The main thread is blocked in its idle read (or waiting for the baton), not in
                # a handler: leave that read now. Never raised into bridge code.
                raise _StopRequestedError

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
