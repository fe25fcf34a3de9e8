"""The worker's side of the pipe: framed, codec-switching, thread-safe writes.

Theory of operation
-------------------
Two threads write: the main thread (replies, stream chunks, callback requests, and whatever it
answers while it is the reader) and the control thread (ping/cancel/hello replies and protocol
failures while it is the reader). One lock serialises encode+write so frames never interleave
and a codec switch (after ``hello``) is atomic with respect to writers; the encoder, used only
under that lock, reuses one packer, and each small frame leaves in a single ``write``. Reads,
through :meth:`Transport.read_some`, happen only in the thread holding the server's reader baton
(see :mod:`mlbridge._worker.serve`), so the decoder is never used by two threads at once.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from typing import Any

from .._protocol.codec import Codec, JsonCodec
from .._protocol.framing import (
    FrameDecoder,
    OversizedFrame,
    frame_header,
    frame_header_unchecked,
)
from .._protocol.messages import timestamp
from ..errors import FrameTooLargeError

__all__ = ["HostGoneError", "Transport"]

_READ_MIN = 64 * 1024
_READ_MAX = 4 * 1024 * 1024
_BIG_FRAME = 256 * 1024  # frames this large make the pipes grow to _BIG_PIPE
_BIG_PIPE = 1024 * 1024


_header = frame_header_unchecked


class HostGoneError(Exception):
    """The host closed its end of the pipe."""


class Transport:
    def __init__(self, in_fd: int, out_fd: int, max_frame_bytes: int) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.codec: Codec = JsonCodec()
        self._encode = self.codec.encoder()  # used under _wlock only: may reuse a packer
        #: ``codec.decode`` without its error translation (the reader falls back to it)
        self.decode_raw = self.codec.decoder()
        self.decoder = FrameDecoder(max_frame_bytes)
        self._small = min(65536, max_frame_bytes + 1)  # a reply this small: one plain write
        self._wlock = threading.Lock()
        self._pipes_grown = False

    def _grow_pipes(self) -> None:
        """Once big frames show up, enlarge both pipes (Linux ``F_SETPIPE_SZ``).

        A 64 KiB pipe moves a 16 MiB frame in 256 hand-offs between writer and reader; 1 MiB
        cuts that 16-fold. Done lazily so that workers that only see small messages do not
        count 2 MiB of pipe against the user's pipe quota (``pipe-user-pages-soft``).
        """
        self._pipes_grown = True
        set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
        if set_size is None:
            return
        for fd in (self.in_fd, self.out_fd):
            try:
                fcntl.fcntl(fd, set_size, _BIG_PIPE)
            except OSError:
                pass  # not a pipe, or above pipe-max-size: the default still works

    def switch_codec(self, codec: Codec) -> None:
        with self._wlock:
            self.codec = codec
            self._encode = codec.encoder()
            self.decode_raw = codec.decoder()

    @property
    def max_frame_bytes(self) -> int:
        """The frame limit, the same both ways (the host runs the worker with its own)."""
        return self.decoder.max_frame_bytes

    def _too_large(self, what: str, size: int) -> FrameTooLargeError:
        limit = self.max_frame_bytes
        return FrameTooLargeError(
            f"{what} is {size:,} bytes encoded, over the {limit:,}-byte frame limit "
            f"(max_frame_bytes = {limit}), so it was not sent. Return less per call (stream it "
            "in chunks, or keep it in a resource and fetch it in pieces), or raise the bridge "
            "option max_frame_bytes (both sides use it)."
        )

    def send(self, msg: dict[str, Any]) -> None:
        """Encode and write one frame. Raises UnsupportedPayloadError (cannot be encoded) or
        FrameTooLargeError (over ``max_frame_bytes``) before writing anything."""
        with self._wlock:
            payload = self._encode(msg)
            if len(payload) > self.decoder.max_frame_bytes:
                if "chunk" in msg:
                    what = f"a stream chunk of call {msg.get('id')}"
                elif "cb" in msg:
                    what = f"the call back to {msg.get('bridge')}:{msg.get('command')}"
                else:
                    what = "a frame"
                raise self._too_large(what, len(payload))
            self._write(payload)

    def send_reply(self, reply: dict[str, Any], command: str | None = None) -> None:
        """Send a final reply; one that cannot be encoded, or whose frame would exceed
        ``max_frame_bytes``, becomes a failure saying why (the worker serves on)."""
        with self._wlock:
            try:
                payload = self._encode(reply)
            except Exception as exc:  # any encoding failure becomes a failure reply
                payload = self._failure(reply, f"the reply could not be encoded: {exc}", exc)
            else:
                size = len(payload)
                if size < self._small:  # _write(), its common case inlined (one write)
                    try:
                        n = os.write(self.out_fd, _header(size) + payload)
                    except (BrokenPipeError, ConnectionResetError) as exc:
                        raise HostGoneError("host closed the pipe") from exc
                    if n != size + 4:
                        self._write_rest(memoryview(_header(size) + payload)[n:])
                    return
                if size > self.decoder.max_frame_bytes:
                    rid = reply.get("id", 0)
                    call = f"call {rid} ({command})" if command else f"call {rid}"
                    too_large = self._too_large(f"the reply to {call}", size)
                    del payload  # free it before encoding the failure
                    payload = self._failure(reply, str(too_large), too_large)
            self._write(payload)

    def _failure(self, reply: dict[str, Any], error: str, exc: Exception) -> bytes:
        return self._encode(
            {
                "id": reply.get("id", 0),
                "success": False,
                "error": error,
                "error_type": type(exc).__name__,
                "error_code": getattr(exc, "code", None) or "unsupported_payload",
                "timestamp": reply.get("timestamp") or timestamp(),
            }
        )

    def _write(self, payload: bytes) -> None:
        """One frame (under ``_wlock``; ``payload`` is within ``max_frame_bytes``): a small one
        in a single ``write``."""
        size = len(payload)
        try:
            if size < 65536:
                data = frame_header_unchecked(size) + payload
                n = os.write(self.out_fd, data)
                if n == size + 4:
                    return
                self._write_rest(memoryview(data)[n:])
                return
            if size >= _BIG_FRAME and not self._pipes_grown:
                self._grow_pipes()
            header = frame_header(size)
            parts = [header, payload]
            n = os.writev(self.out_fd, parts)
            total = len(header) + len(payload)
            if n < total:
                rest = (
                    memoryview(header + payload)[n:]
                    if n < len(header)
                    else memoryview(payload)[n - len(header) :]
                )
                self._write_rest(rest)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise HostGoneError("host closed the pipe") from exc

    def _write_rest(self, view: memoryview) -> None:
        while view:
            n = os.write(self.out_fd, view)
            view = view[n:]

    def read_some(self) -> list[bytes | OversizedFrame] | None:
        """One ``read`` (blocking): the frames it completed, or None at end of input."""
        want = self.decoder.bytes_wanted()
        if want >= _BIG_FRAME and not self._pipes_grown:
            self._grow_pipes()
        try:
            data = os.read(self.in_fd, _READ_MIN if want < _READ_MIN else min(want, _READ_MAX))
        except OSError:
            return None
        if not data:
            return None
        return self.decoder.feed(data)

    def read_frames(self) -> Iterator[bytes | OversizedFrame]:
        """Yield frames until end of input (then return)."""
        dec = self.decoder
        fd = self.in_fd
        while True:
            want = dec.bytes_wanted()
            size = _READ_MIN if want < _READ_MIN else min(want, _READ_MAX)
            try:
                data = os.read(fd, size)
            except OSError:
                return
            if not data:
                return
            yield from dec.feed(data)
