"""Test helpers: drive one real worker process over its pipes, synchronously, with timeouts.

>>> with WorkerProcess("echo") as w:
...     w.hello("msgpack")
...     w.request("echo", {"a": 1})
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ._protocol.codec import Codec, JsonCodec, get_codec
from ._protocol.framing import FrameDecoder, OversizedFrame, encode_frame
from ._protocol.messages import Failure
from ._protocol.wire_errors import exception_from_failure

__all__ = ["WorkerProcess"]


class WorkerProcess:
    """A worker started with ``python -m mlbridge.worker <bridge>``, spoken to frame by frame."""

    def __init__(
        self,
        bridge: str,
        *extra_args: str,
        settings: dict[str, Any] | None = None,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        max_frame_bytes: int | None = None,
    ) -> None:
        argv = [python, "-m", "mlbridge.worker", bridge, *extra_args]
        if settings is not None:
            argv += ["--settings-json", json.dumps(settings)]
        if max_frame_bytes is not None:
            argv += ["--max-frame-bytes", str(max_frame_bytes)]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.codec: Codec = JsonCodec()
        self._decoder = FrameDecoder(1 << 31)
        self._frames: list[Any] = []
        self._ids = itertools.count(1)

    # -- raw frames ----------------------------------------------------------------------
    def send_bytes(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, msg: Any) -> None:
        self.send_bytes(encode_frame(self.codec.encode(msg)))

    def recv(self, timeout: float = 10.0) -> Any:
        """The next decoded frame; raises TimeoutError if none arrives in ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while not self._frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no frame from the worker within {timeout}s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            data = os.read(fd, 1 << 20)
            if not data:
                raise EOFError(f"worker closed its output (exit code {self.proc.poll()})")
            for frame in self._decoder.feed(data):
                assert not isinstance(frame, OversizedFrame)
                self._frames.append(self.codec.decode(frame))
        return self._frames.pop(0)

    # -- requests ------------------------------------------------------------------------
    def request(
        self,
        command: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        raw: bool = False,
        **extra: Any,
    ) -> Any:
        """Send one request and return its result (or the whole reply with ``raw=True``).

        A failure reply is raised as the matching :mod:`mlbridge.errors` exception.
        """
        rid = next(self._ids)
        self.send({"id": rid, "command": command, "args": args or {}, **extra})
        reply = self.recv(timeout)
        if raw:
            return reply
        assert reply.get("id") == rid, f"reply for id {reply.get('id')} while waiting for {rid}"
        if not reply.get("success"):
            raise exception_from_failure(Failure.from_wire(reply))
        return reply["result"]

    def hello(self, codec: str = "msgpack", capabilities: Sequence[str] = ()) -> dict[str, Any]:
        result = self.request(
            "hello", {"protocol_version": 2, "codecs": [codec], "capabilities": list(capabilities)}
        )
        self.codec = get_codec(result["codec"])
        return dict(result)

    # -- lifecycle -----------------------------------------------------------------------
    def close_input(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait(self, timeout: float = 5.0) -> int:
        return self.proc.wait(timeout)

    def stderr_text(self) -> str:
        """All stderr so far (only once the process has exited)."""
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.close_input()
                self.proc.wait(3)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.proc.kill()
                self.proc.wait(3)
        for stream in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if stream is not None and not stream.closed:
                stream.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
