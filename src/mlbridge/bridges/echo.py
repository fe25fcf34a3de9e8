"""The ``echo`` bridge: no framework, every behaviour the runtime must survive, on demand.

Used by the tests and benchmarks. Commands:

* ``echo`` -> its args back; ``bytes {n}`` -> ``n`` bytes (MessagePack only); ``text {n}`` -> a
  string of ``n`` characters (any codec); ``pow2 {exp}`` -> the integer ``2**exp``
* ``sleep {seconds}`` (honours cancel); ``busy {seconds}`` (ignores cancel: a hang)
* ``crash {mode: exit|segv|abort|raise, code}``
* ``allocate {mb}`` keeps memory; ``free`` releases it
* ``print {text}`` writes to ``sys.stdout``, to C-level fd 1, and (optionally) to stderr
* ``stream {n, delay, size, binary}`` yields ``n`` chunks (honours cancel); with ``binary``
  each chunk's ``data`` is ``size`` bytes (byte ``i % 256``), else ``size`` characters
* ``fail {type, message}`` raises that exception
* ``call_host {bridge, command, args}`` / ``stream_host`` call another bridge through the host
* ``pid`` -> this worker's pid; ``settings`` -> its framework settings; ``env {name}``
* ``trace_context`` -> the call's trace context as the worker received it (None if untraced)
* ``set_bridge_state {state, fail}`` sets each key bridge-wide (then raises if ``fail``);
  ``bridge_state`` -> the bridge-wide state this worker holds
* ``count {fail, stream, ...}`` -> ``{"calls": n, "pid", "args"}`` where ``n`` counts this
  worker's ``count`` calls (failed ones too); declared *cacheable*, so with ``cache_ttl`` set a
  repeat is answered by the host's result cache and ``n`` shows whether the worker ran it.
  ``fail`` raises instead; ``"stream": true`` yields ``stream`` chunks first
* resource types ``counter`` (stateful: state survives a rebuild; streamed with ``"stream": true``
  it counts up ``n`` steps, one chunk each) and ``prefixer``
"""

from __future__ import annotations

import builtins
import ctypes
import os
import signal
import sys
import time
from collections.abc import Generator
from typing import Any

from .. import errors
from .base import BaseBridge, ResourceType

__all__ = ["EchoBridge"]


class _Counter:
    def __init__(self, start: int, step: int) -> None:
        self.value = start
        self.step = step


class EchoBridge(BaseBridge):
    name = "echo"

    def _initialize_framework(self) -> None:
        self._hoard: list[bytearray] = []
        if self.settings.get("fail_boot"):
            raise RuntimeError(f"echo bridge told to fail at boot: {self.settings['fail_boot']}")
        delay = float(self.settings.get("boot_delay", 0))
        if delay:
            time.sleep(delay)

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "echo", "version": "1.0", "description": "test bridge, no framework"}

    def _register_handlers(self) -> None:
        r = self.register_handler
        r("echo", lambda a: a)
        r("trace_context", lambda a: self.call.trace_context)
        r(
            "bytes",
            lambda a: b"\x00\x01" * (int(a.get("n", 0)) // 2) + b"\x07" * (int(a.get("n", 0)) % 2),
        )
        r("sleep", self._sleep)
        r("busy", self._busy)
        r("crash", self._crash)
        r("allocate", self._allocate)
        r("free", self._free)
        r("print", self._print)
        r("stream", self._stream)
        r("fail", self._fail)
        r("call_host", self._call_host)
        r("stream_host", self._stream_host)
        r("pid", lambda a: os.getpid())
        r("settings", lambda a: self.settings)
        r("env", lambda a: os.environ.get(str(a.get("name", ""))))
        r("session", lambda a: self.call.session_id)
        r("text", lambda a: "x" * int(a.get("n", 0)))
        r("pow2", lambda a: 2 ** int(a.get("exp", 0)))
        r("count", self._count, cacheable=True)
        r("set_bridge_state", self._set_bridge_state)
        r("bridge_state", lambda a: dict(self.bridge_state))
        self.register_resource_type(
            ResourceType(
                "counter",
                create=self._make_counter,
                execute=self._bump,
                describe=lambda c: {"value": c.value},
                dump_state=lambda c: {"value": c.value},
                stream=self._count_up,
            )
        )
        self.register_resource_type(
            ResourceType(
                "prefixer",
                create=lambda cfg, state: str(cfg.get("prefix", "")),
                execute=lambda p, inputs: {"text": p + str(inputs.get("text", ""))},
            )
        )

    def _sleep(self, args: dict[str, Any]) -> dict[str, Any]:
        seconds = float(args.get("seconds", 0))
        deadline = time.monotonic() + seconds
        while True:
            self.check_cancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                return {"slept": seconds, "pid": os.getpid()}
            time.sleep(min(left, 0.01))

    def _busy(self, args: dict[str, Any]) -> dict[str, Any]:
        seconds = float(args.get("seconds", 0))
        time.sleep(seconds)
        return {"slept": seconds}

    def _crash(self, args: dict[str, Any]) -> None:
        mode = args.get("mode", "exit")
        sys.stderr.write(f"echo bridge: crashing on purpose (mode={mode})\n")
        sys.stderr.flush()
        if mode == "exit":
            os._exit(int(args.get("code", 3)))
        if mode == "segv":
            ctypes.string_at(0)  # a real SIGSEGV in C
        if mode == "abort":
            os.abort()
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise errors.InvalidRequestError(
            f"unknown crash mode {mode!r}; use exit, segv, abort, kill"
        )

    def _allocate(self, args: dict[str, Any]) -> dict[str, Any]:
        mb = float(args.get("mb", 1))
        block = bytearray(int(mb * 1024 * 1024))
        for i in range(0, len(block), 4096):  # touch every page so it counts in RSS
            block[i] = 1
        self._hoard.append(block)
        return {"held_mb": sum(len(b) for b in self._hoard) / 1048576}

    def _free(self, args: dict[str, Any]) -> dict[str, Any]:
        self._hoard.clear()
        return {"held_mb": 0}

    def _print(self, args: dict[str, Any]) -> dict[str, Any]:
        text = str(args.get("text", "noise"))
        print(text)  # noqa: T201 - Python-level stdout, on purpose
        sys.stdout.flush()
        os.write(1, (text + "\n").encode())  # C-level fd 1
        libc = ctypes.CDLL(None)
        libc.puts(text.encode())  # a C library's own stdio
        libc.fflush(None)
        return {"printed": text}

    def _stream(self, args: dict[str, Any]) -> Generator[Any, None, Any]:
        n = int(args.get("n", 3))
        delay = float(args.get("delay", 0))
        size = args.get("size")
        binary = bool(args.get("binary"))
        for i in range(n):
            if delay:
                time.sleep(delay)
            if size and binary:
                yield {"index": i, "data": bytes([i % 256]) * int(size)}
            else:
                yield {"index": i, "data": "x" * int(size)} if size else {"index": i}
        return {"chunks": n, "done": True}

    def _count(self, args: dict[str, Any]) -> Any:
        self._count_calls = getattr(self, "_count_calls", 0) + 1
        if args.get("fail"):
            raise ValueError(f"count told to fail: {args['fail']}")
        result = {"calls": self._count_calls, "pid": os.getpid(), "args": args}
        if self.call.stream:
            return self._count_stream(int(args.get("stream") or 2), result)
        return result

    @staticmethod
    def _count_stream(n: int, result: dict[str, Any]) -> Generator[Any, None, Any]:
        for i in range(n):
            yield {"index": i}
        return result

    def _fail(self, args: dict[str, Any]) -> None:
        kind = str(args.get("type", "ValueError"))
        message = str(args.get("message", "requested failure"))
        exc_type = getattr(errors, kind, None) or getattr(builtins, kind, None)
        if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
            # An unknown name becomes a third-party-looking type, e.g. RateLimitError.
            exc_type = type(kind, (Exception,), {})
        raise exc_type(message)

    def _call_host(self, args: dict[str, Any]) -> Any:
        assert self.host is not None
        return self.host.call(
            str(args["bridge"]),
            str(args["command"]),
            args.get("args") or {},
            timeout=args.get("timeout"),
        )

    def _stream_host(self, args: dict[str, Any]) -> Generator[Any, None, Any]:
        assert self.host is not None
        gen = self.host.stream(str(args["bridge"]), str(args["command"]), args.get("args") or {})
        final = yield from gen
        return {"inner_result": final}

    def _set_bridge_state(self, args: dict[str, Any]) -> dict[str, Any]:
        state = args.get("state") or {}
        for key, value in state.items():
            self.set_bridge_state(key, value)
        if args.get("fail"):
            raise errors.InvalidRequestError(f"failing after setting {sorted(state)}, on request")
        return {"set": list(state)}

    def _count_up(self, counter: _Counter, inputs: dict[str, Any]) -> Generator[Any, None, Any]:
        n = int(inputs.get("n", 3))
        delay = float(inputs.get("delay", 0))
        for _ in range(n):
            if delay:
                time.sleep(delay)
            counter.value += counter.step
            yield {"value": counter.value}
        return {"value": counter.value, "steps": n, "pid": os.getpid()}

    def _make_counter(self, config: dict[str, Any], state: Any) -> _Counter:
        start = int(config.get("start", 0))
        if isinstance(state, dict) and "value" in state:
            start = int(state["value"])
        return _Counter(start, int(config.get("step", 1)))

    def _bump(self, counter: _Counter, inputs: dict[str, Any]) -> dict[str, Any]:
        counter.value += int(inputs.get("by", counter.step))
        return {"value": counter.value, "pid": os.getpid()}
