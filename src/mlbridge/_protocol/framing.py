"""Length-prefixed framing (Erlang ``{packet, 4}``), sans I/O.

A frame is a 4-byte unsigned big-endian length ``N`` followed by ``N`` payload bytes.
:class:`FrameDecoder` is fed whatever bytes arrive and hands back complete frames. A frame whose
announced length exceeds ``max_frame_bytes`` is refused *before* any buffer for it is allocated:
the decoder reports an :class:`OversizedFrame` and then skips exactly that many bytes, so the
stream stays in step and the next frame decodes normally.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "FrameDecoder",
    "OversizedFrame",
    "encode_frame",
    "frame_header",
    "frame_header_unchecked",
]

DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
HEADER_BYTES = 4
_MAX_ENCODABLE = 0xFFFFFFFF
_HEADER = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """Marks a frame that was refused (and skipped) because it was too large."""

    length: int
    limit: int


def frame_header(length: int) -> bytes:
    """The 4-byte header for a payload of ``length`` bytes."""
    if length < 0 or length > _MAX_ENCODABLE:
        raise ValueError(f"frame length {length} does not fit in a 4-byte header")
    return _HEADER.pack(length)


#: :func:`frame_header` without the range check, for writers whose payloads are known to be
#: within ``max_frame_bytes`` (itself below 4 GiB).
frame_header_unchecked = _HEADER.pack


def encode_frame(payload: bytes) -> bytes:
    """Header plus payload in one ``bytes`` (copies; writers prefer writev of the two parts)."""
    return frame_header(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` returns the frames (and refusals) ``data`` completed."""

    __slots__ = ("_buf", "_need", "_skip", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._need = -1  # payload length of the frame being read; -1 while reading a header
        self._skip = 0  # bytes of a refused frame still to discard

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for the stream to end)."""
        return not self._buf and self._skip == 0 and self._need < 0

    def bytes_wanted(self) -> int:
        """How many more bytes would complete the pending header or frame (a read-size hint)."""
        if self._skip:
            return self._skip
        if self._need < 0:
            return HEADER_BYTES - len(self._buf)
        return self._need - len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | OversizedFrame]:
        # Fast path, the common case of request/reply traffic: exactly one whole frame.
        if self._need < 0 and not self._buf and not self._skip and len(data) >= HEADER_BYTES:
            (length,) = _HEADER.unpack_from(data)
            if length + HEADER_BYTES == len(data) and length <= self.max_frame_bytes:
                return [bytes(data[HEADER_BYTES:])]
        out: list[bytes | OversizedFrame] = []
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            if self._need < 0:
                take = HEADER_BYTES - len(self._buf)
                if not self._buf and len(view) >= HEADER_BYTES:
                    (length,) = _HEADER.unpack_from(view)
                    view = view[HEADER_BYTES:]
                else:
                    self._buf += view[:take]
                    view = view[take:]
                    if len(self._buf) < HEADER_BYTES:
                        break
                    (length,) = _HEADER.unpack_from(self._buf)
                    self._buf.clear()
                if length > self.max_frame_bytes:
                    out.append(OversizedFrame(length, self.max_frame_bytes))
                    self._skip = length
                    continue
                if not self._buf and len(view) >= length:
                    out.append(bytes(view[:length]))
                    view = view[length:]
                    continue
                self._need = length
            take = self._need - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == self._need:
                out.append(bytes(self._buf))
                self._buf = bytearray()
                self._need = -1
        return out
