"""The host's side of one worker connection, sans I/O: calls in -> bytes out, bytes in -> events.

Theory of operation
-------------------
A :class:`Connection` holds what the wire needs and nothing else: the negotiated codec, the
frame decoder, the request id counter. :meth:`Connection.request` turns a call into the frame
bytes to send (the shape of :class:`~mlbridge._protocol.messages.Request`);
:meth:`Connection.receive` turns bytes from the worker into calls on a
:class:`ConnectionEvents` handler: a final reply, a
stream chunk, a call-back request or its withdrawal, a stray frame, or a fatal stream error
(oversized or undecodable frame: the stream cannot be trusted any more). Who waits for which id,
timeouts and processes belong to :mod:`.channel`; bytes are moved by a backend transport. The
same object is used by every backend, and is unit-tested by feeding it bytes.

Request ids start at 1, so a failure with id 0 (the v1 wire's "I could not read your frame") is
never mistaken for a reply on a host connection.
"""

from __future__ import annotations

import itertools
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .._protocol.codec import Codec, JsonCodec, get_codec
from .._protocol.framing import HEADER_BYTES, FrameDecoder, OversizedFrame, frame_header
from .._protocol.messages import CallbackRequest, request_wire
from ..errors import MLBridgeError, ProtocolError

__all__ = ["Connection", "ConnectionEvents"]

_frame_length = struct.Struct(">I").unpack_from
_frame_header = struct.Struct(">I").pack  # (payloads within max_frame_bytes, below 4 GiB)


class ConnectionEvents(Protocol):
    def on_reply(self, rid: int, msg: dict[str, Any]) -> None: ...

    def on_chunk(self, rid: int, chunk: Any) -> None: ...

    def on_callback(self, msg: dict[str, Any]) -> None: ...

    def on_callback_cancel(self, cb: Any) -> None: ...

    def on_stray(self, msg: Any) -> None: ...

    def on_fatal(self, reason: str) -> None: ...


class Connection:
    __slots__ = (
        "_decode",
        "_decode_codec",
        "_direct_codec",
        "_direct_encode",
        "_elock",
        "_encode",
        "_encode_codec",
        "_ids",
        "at_frame",
        "codec",
        "decoder",
        "first_bytes",
        "framed",
        "max_frame_bytes",
    )

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.codec: Codec = JsonCodec()
        self.decoder = FrameDecoder(max_frame_bytes)
        self._ids = itertools.count(1)
        # A reused encoder (one packer) for whichever thread gets _elock; the codec's own,
        # thread-safe encode for a thread that finds it taken.
        self._elock = threading.Lock()
        self._encode: Callable[[Any], bytes] = self.codec.encode
        self._encode_codec: Codec | None = None
        self._direct_encode: Callable[[Any], bytes] = self.codec.encode  # see plain_request
        self._direct_codec: Codec | None = None
        self._decode: Callable[[bytes | memoryview], Any] = self.codec.decoder()  # take_reply
        self._decode_codec: Codec | None = self.codec
        # Until a first frame decodes, the first bytes seen: what a worker printed to its real
        # stdout before the runtime took it over is shown, instead of a bogus frame length.
        self.first_bytes = b""
        self.framed = False
        # framed, and nothing of a frame buffered: the next bytes start a frame (whole_reply)
        self.at_frame = False

    def use_codec(self, name: str) -> None:
        """Switch codecs (after the ``hello`` reply, as both sides do)."""
        self.codec = get_codec(name)

    def next_id(self) -> int:
        return next(self._ids)

    # ------------------------------------------------------------------ out
    def request(
        self,
        rid: int,
        command: str,
        args: dict[str, Any],
        *,
        stream: bool = False,
        session_id: str | None = None,
        context: dict[str, str] | None = None,
    ) -> tuple[bytes, bytes]:
        """The frame (header, payload) of a request; ProtocolError when it is too large."""
        return self.frame(request_wire(rid, command, args, stream, session_id, context))

    def plain_request(self, command: str, args: dict[str, Any]) -> tuple[int, bytes, bytes]:
        """A new id and the frame of a plain ``{"id", "command", "args"}`` request (no stream,
        session or trace context): the blocking API's direct call. Only the thread that has
        the worker checked out calls this, so its encoder (one reused packer) needs no lock."""
        rid = next(self._ids)
        codec = self.codec
        if self._direct_codec is not codec:
            self._direct_encode, self._direct_codec = codec.encoder(), codec
        payload = self._direct_encode({"id": rid, "command": command, "args": args})
        if len(payload) > self.max_frame_bytes:
            raise self._too_large(len(payload))
        return rid, _frame_header(len(payload)), payload

    def cancel(self, target: int) -> tuple[bytes, bytes]:
        return self.request(self.next_id(), "cancel", {"target": target})

    def frame(self, msg: dict[str, Any]) -> tuple[bytes, bytes]:
        codec = self.codec
        if self._elock.acquire(blocking=False):
            try:
                if self._encode_codec is not codec:  # a new codec (hello) gets a new encoder
                    self._encode, self._encode_codec = codec.encoder(), codec
                payload = self._encode(msg)
            finally:
                self._elock.release()
        else:
            payload = codec.encode(msg)
        if len(payload) > self.max_frame_bytes:
            raise self._too_large(len(payload))
        return frame_header(len(payload)), payload

    def _too_large(self, size: int) -> ProtocolError:
        return ProtocolError(
            f"a {size}-byte message exceeds max_frame_bytes={self.max_frame_bytes}; "
            "send it in pieces or raise the bridge option max_frame_bytes"
        )

    def callback_reply(self, msg: dict[str, Any]) -> tuple[bytes, bytes]:
        """A reply to a worker's call-back; one that cannot be encoded becomes a failure."""
        try:
            return self.frame(msg)
        except MLBridgeError as exc:
            return self.frame(
                {
                    "cb": msg.get("cb"),
                    "success": False,
                    "error": str(exc),
                    "error_type": type(exc).__name__,
                    "error_code": exc.code,
                }
            )

    # ------------------------------------------------------------------ in
    def whole_reply(self, data: bytes | memoryview, rid: int) -> dict[str, Any] | None:
        """The final reply to call ``rid`` when ``data`` is exactly that one frame with nothing
        buffered before it (a call's reply read on its own: the hot path); else None, and
        nothing was consumed (hand ``data`` to :meth:`receive`)."""
        n = len(data)
        if (
            not self.at_frame
            or n <= HEADER_BYTES
            or _frame_length(data)[0] != n - HEADER_BYTES
            or n - HEADER_BYTES > self.max_frame_bytes
        ):
            return None
        codec = self.codec
        if self._decode_codec is not codec:
            self._decode, self._decode_codec = codec.decoder(), codec
        try:
            msg = self._decode(data[HEADER_BYTES:])
        except Exception:  # receive() decodes it again and reports it
            return None
        if type(msg) is dict and msg.get("id") == rid and "chunk" not in msg:
            return msg
        return None  # a single frame, not this reply (a call-back...): receive() routes it

    def take_reply(
        self, data: bytes | memoryview, rid: int, events: ConnectionEvents
    ) -> dict[str, Any] | None:
        """Consume ``data``: the final reply to call ``rid`` when :meth:`whole_reply` finds
        it; anything else goes through :meth:`receive` to ``events`` (None)."""
        msg = self.whole_reply(data, rid)
        if msg is None:
            self.receive(data, events)
        return msg

    def receive(self, data: bytes | memoryview, events: ConnectionEvents) -> None:
        self.at_frame = False  # (until this data is consumed without trouble)
        if not self.framed and len(self.first_bytes) < 200:
            self.first_bytes += bytes(data[: 200 - len(self.first_bytes)])
        for frame in self.decoder.feed(data):
            if isinstance(frame, OversizedFrame):
                events.on_fatal(
                    self._garbage_before_first_frame()
                    or f"it sent a {frame.length}-byte frame over max_frame_bytes={frame.limit}"
                )
                return
            try:
                msg = self.codec.decode(frame)
            except MLBridgeError as exc:
                events.on_fatal(
                    self._garbage_before_first_frame() or f"it sent an undecodable frame ({exc})"
                )
                return
            self.framed = True
            self.route(msg, events)
        self.at_frame = self.framed and self.decoder.at_boundary

    def _garbage_before_first_frame(self) -> str | None:
        if self.framed:
            return None
        return (
            f"it wrote non-protocol bytes to its stdout before answering hello: "
            f"{self.first_bytes[:120]!r}. Something printed to stdout before the worker runtime "
            "took it over (a sitecustomize or usercustomize module, a .pth file, or "
            "PYTHONSTARTUP): make it write to stderr"
        )

    @staticmethod
    def route(msg: Any, events: ConnectionEvents) -> None:
        if type(msg) is not dict:
            events.on_stray(msg)
            return
        rid = msg.get("id")
        if type(rid) is int and rid > 0:
            if "chunk" in msg:
                events.on_chunk(rid, msg["chunk"])
            else:
                events.on_reply(rid, msg)
        elif "cb" in msg and "bridge" in msg:
            events.on_callback(msg)
        elif "cb_cancel" in msg:
            events.on_callback_cancel(msg["cb_cancel"])
        else:
            events.on_stray(msg)

    @staticmethod
    def parse_callback(msg: dict[str, Any]) -> CallbackRequest:
        return CallbackRequest.from_wire(msg)
