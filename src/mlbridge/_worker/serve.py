"""The worker's serve loop: a control thread that reads, a main thread that works.

Theory of operation
-------------------
Owners:
* The **control thread** owns the input pipe and the frame decoder. It decodes every frame and
  answers at once what must not wait: ``hello`` (then switches codec), ``ping``/``heartbeat``,
  ``cancel``, and protocol failures (undecodable frames -> id 0, bad requests -> their id,
  oversized frames -> id 0, then the decoder skips them). Callback replies go to the
  :class:`HostClient`. Everything else is appended to the work queue, in arrival order.
* The **main thread** owns the bridge. It takes requests from the queue one at a time, runs the
  handler, and writes the reply (or stream chunks then the reply). Frameworks that insist on the
  main thread (signals, some C libraries) are happy.

Invariants: every request that parses gets exactly one final reply with its id. A cancelled
request gets a ``cancelled`` failure (queued ones without running). At end of input the worker
exits 0 within a second: queued work drains for half of that, then everything is cancelled, and
if a handler ignores cancellation the process leaves anyway. SIGTERM/SIGINT handlers only set a
flag, cancel, and enqueue the stop marker; cleanup runs on the main thread.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
import types
from typing import Any

from .._protocol.codec import get_codec
from .._protocol.exit_codes import EXIT_OK
from .._protocol.framing import OversizedFrame
from .._protocol.messages import PROTOCOL_VERSION, MessageError, parse_request, timestamp
from .._protocol.wire_errors import failure_from_exception
from ..bridges.base import BaseBridge, CallContext
from ..errors import CancelledCallError, DecodeError, FrameTooLargeError, InvalidRequestError
from .host_client import HostClient
from .transport import HostGoneError, Transport

__all__ = ["CAPABILITIES", "Server"]

CAPABILITIES = (
    "streaming",
    "cancel",
    "heartbeat",
    "callbacks",
    "binary",
    "resource_states",
)
EOF_DRAIN_S = 0.5
EOF_CANCEL_S = 0.4
_STOP = None


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


class Server:
    def __init__(self, bridge: BaseBridge, transport: Transport) -> None:
        self.bridge = bridge
        self.transport = transport
        self.v2 = False
        self.queue: queue.SimpleQueue[tuple[Any, CallContext] | None] = queue.SimpleQueue()
        self.pending: dict[int, CallContext] = {}
        self.stopping = threading.Event()
        self.main_done = threading.Event()
        self.host = HostClient(transport, current_call=lambda: bridge._call)
        bridge.host = self.host
        self.with_traceback = True

    # ------------------------------------------------------------------ control thread
    def reader(self) -> None:
        try:
            for frame in self.transport.read_frames():
                try:
                    if type(frame) is OversizedFrame:
                        self._refuse_oversized(frame)
                    else:
                        self._on_frame(frame)  # type: ignore[arg-type]
                except HostGoneError:
                    raise
                except Exception as exc:
                    # A bug (ours or a bridge's control handler) must not kill the reader:
                    # report it against id 0 and keep serving.
                    self._send_failure(0, exc)
        except HostGoneError:
            pass
        except Exception as exc:
            sys.stderr.write(f"mlbridge worker: control thread failed: {exc!r}\n")
        self._on_eof()

    def _refuse_oversized(self, frame: OversizedFrame) -> None:
        exc = FrameTooLargeError(
            f"frame of {frame.length} bytes refused: the limit is {frame.limit} bytes "
            "(max_frame_bytes). Send large arrays in pieces, or raise the limit on both sides.",
        )
        self._send_failure(0, exc, with_tb=False)

    def _on_frame(self, frame: bytes) -> None:
        try:
            msg = self.transport.codec.decode(frame)
        except DecodeError as exc:
            self._send_failure(0, exc, with_tb=False)
            return
        if type(msg) is dict and "cb" in msg and "command" not in msg:
            self.host.deliver(msg)
            return
        try:
            req = parse_request(msg)
        except MessageError as exc:
            self._send_failure(exc.id, InvalidRequestError(str(exc)), with_tb=False)
            return
        command = req.command
        base = command.rpartition(":")[2]
        if base == "hello":
            self._hello(req.id, req.args)
            return
        if base == "cancel":
            self._cancel(req.id, req.args)
            return
        try:
            handler, control = self.bridge.resolve(command)
        except Exception as exc:
            self._send_failure(req.id, exc, with_tb=False)
            return
        if control:
            try:
                result = handler(req.args)
            except Exception as exc:
                self._send_failure(req.id, exc)
                return
            self._send_success(req.id, result, None)
            return
        ctx = CallContext(req.id, command, req.session_id, req.stream)
        self.pending[req.id] = ctx
        self.queue.put((req, ctx))

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
            "max_frame_bytes": self.transport.decoder.max_frame_bytes,
        }
        self._send_success(rid, reply, None)
        self.transport.switch_codec(get_codec(chosen))
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
        ctx.cancel_event.set()
        self._send_success(rid, {"cancelled": True, "target": target}, None)

    def _on_eof(self) -> None:
        self.host.close("the host closed the connection")
        self.queue.put(_STOP)
        if self.main_done.wait(EOF_DRAIN_S):
            return
        for ctx in list(self.pending.values()):
            ctx.cancel_event.set()
        if self.main_done.wait(EOF_CANCEL_S):
            return
        # A handler ignored cancellation; the host is gone, so leave without it.
        os._exit(EXIT_OK)

    # ------------------------------------------------------------------ main thread
    def serve_forever(self) -> int:
        self._install_signals()
        reader = threading.Thread(target=self.reader, name="mlbridge-control", daemon=True)
        reader.start()
        bridge = self.bridge
        q = self.queue
        pending = self.pending
        try:
            while True:
                item = q.get()
                if item is _STOP or self.stopping.is_set():
                    break
                req, ctx = item
                if ctx.cancel_event.is_set():
                    pending.pop(req.id, None)
                    self._send_failure(
                        req.id, CancelledCallError(f"call {req.id} was cancelled before it ran")
                    )
                    continue
                self._run(bridge, req, ctx)
                pending.pop(req.id, None)
            self._refuse_queued("the worker is shutting down")
        except HostGoneError:
            pass
        finally:
            bridge.run_cleanup()
            self.main_done.set()
        return EXIT_OK

    def _refuse_queued(self, why: str) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is None:
                continue
            req, _ = item
            self.pending.pop(req.id, None)
            self._send_failure(req.id, CancelledCallError(f"call {req.id} not run: {why}"))

    def _run(self, bridge: BaseBridge, req: Any, ctx: CallContext) -> None:
        t0 = time.perf_counter()
        ok = True
        try:
            result = bridge.dispatch(ctx, req.args)
            if isinstance(result, types.GeneratorType):
                result = self._drain(bridge, result, ctx)
        except Exception as exc:
            ok = False
            bridge.record(ctx.command, time.perf_counter() - t0, False)
            self._send_failure(req.id, exc)
            return
        bridge.record(ctx.command, time.perf_counter() - t0, ok)
        extra = (
            {"resource_states": ctx.resource_states} if self.v2 and ctx.resource_states else None
        )
        self._send_success(req.id, result, extra)

    def _drain(
        self, bridge: BaseBridge, gen: types.GeneratorType[Any, Any, Any], ctx: CallContext
    ) -> Any:
        bridge._call = ctx  # generators run their body lazily, after dispatch returned
        send = self.transport.send
        collected: list[Any] = []
        try:
            while True:
                if ctx.cancel_event.is_set():
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
    def _send_success(self, rid: int, result: Any, extra: dict[str, Any] | None) -> None:
        msg = {"id": rid, "success": True, "result": result, "timestamp": timestamp()}
        if extra:
            msg.update(extra)
        fallback = {"id": rid, "success": False, "error": "", "timestamp": msg["timestamp"]}
        self.transport.send_encoded(msg, fallback)

    def _send_failure(self, rid: int, exc: BaseException, *, with_tb: bool = True) -> None:
        failure = failure_from_exception(rid, exc, with_traceback=with_tb and self.with_traceback)
        self.transport.send_encoded(failure.to_wire(), {"id": rid, "success": False, "error": ""})

    # ------------------------------------------------------------------ signals
    def _install_signals(self) -> None:
        def on_signal(signum: int, frame: Any) -> None:
            self.stopping.set()
            for ctx in list(self.pending.values()):
                ctx.cancel_event.set()
            self.queue.put(_STOP)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
