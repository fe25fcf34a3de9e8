"""FrameDecoder / frame_header: the sans-I/O framing layer, fed every way bytes can arrive."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlbridge._protocol.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    FrameDecoder,
    OversizedFrame,
    encode_frame,
    frame_header,
)

PAYLOADS = [b"", b"a", b'{"id": 1, "command": "ping"}', bytes(range(256)) * 40, b"\x00" * 5]


def _stream(payloads: list[bytes]) -> bytes:
    return b"".join(encode_frame(p) for p in payloads)


def _feed_all(dec: FrameDecoder, chunks: list[bytes]) -> list[bytes | OversizedFrame]:
    out: list[bytes | OversizedFrame] = []
    for chunk in chunks:
        out.extend(dec.feed(chunk))
    return out


# ------------------------------------------------------------------------------- frame_header
def test_frame_header_is_big_endian_u32() -> None:
    assert frame_header(0) == b"\x00\x00\x00\x00"
    assert frame_header(1) == b"\x00\x00\x00\x01"
    assert frame_header(0x01020304) == b"\x01\x02\x03\x04"
    assert frame_header(0xFFFFFFFF) == b"\xff\xff\xff\xff"
    assert len(frame_header(12345)) == HEADER_BYTES


@pytest.mark.parametrize("bad", [-1, 0x1_0000_0000, 1 << 40])
def test_frame_header_refuses_lengths_outside_u32(bad: int) -> None:
    with pytest.raises(ValueError, match="4-byte header"):
        frame_header(bad)


def test_encode_frame_is_header_plus_payload() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def test_default_limit_is_64_mib() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 64 * 1024 * 1024
    assert FrameDecoder().max_frame_bytes == DEFAULT_MAX_FRAME_BYTES


@pytest.mark.parametrize("bad", [0, -5])
def test_decoder_refuses_non_positive_limit(bad: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        FrameDecoder(bad)


# ------------------------------------------------------------------------------- whole frames
def test_several_frames_in_one_feed() -> None:
    dec = FrameDecoder()
    assert dec.feed(_stream(PAYLOADS)) == PAYLOADS
    assert dec.at_boundary
    assert dec.buffered_bytes == 0


def test_byte_by_byte() -> None:
    dec = FrameDecoder()
    data = _stream(PAYLOADS)
    out: list[bytes | OversizedFrame] = []
    for i in range(len(data)):
        got = dec.feed(data[i : i + 1])
        out.extend(got)
        assert len(got) <= 1  # one byte completes at most one frame
    assert out == PAYLOADS
    assert dec.at_boundary


def test_zero_length_frames() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"\x00\x00\x00\x00" * 3) == [b"", b"", b""]
    assert dec.feed(b"\x00\x00") == []
    assert not dec.at_boundary
    assert dec.feed(b"\x00\x00\x00\x00\x00\x01z") == [b"", b"z"]
    assert dec.at_boundary


def test_feed_accepts_bytearray_and_memoryview() -> None:
    data = _stream([b"one", b"two"])
    assert FrameDecoder().feed(bytearray(data)) == [b"one", b"two"]
    assert FrameDecoder().feed(memoryview(data)) == [b"one", b"two"]


def test_frames_are_independent_bytes() -> None:
    """Returned frames do not alias the decoder's buffer (it is reused for the next frame)."""
    dec = FrameDecoder()
    data = _stream([b"first", b"second"])
    got = [*dec.feed(data[:6]), *dec.feed(data[6:])]
    assert got == [b"first", b"second"]
    assert all(type(f) is bytes for f in got)


@settings(max_examples=200, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=12),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_random_splits(payloads: list[bytes], seed: int) -> None:
    data = _stream(payloads)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 20))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    dec = FrameDecoder(max_frame_bytes=1000)
    assert _feed_all(dec, chunks) == payloads
    assert dec.at_boundary


# ------------------------------------------------------------------------------- truncated input
@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5, 9])
def test_truncated_input_yields_nothing_and_is_not_at_boundary(cut: int) -> None:
    data = encode_frame(b"0123456789")  # 14 bytes
    dec = FrameDecoder()
    assert dec.feed(data[:cut]) == []
    assert not dec.at_boundary
    assert dec.bytes_wanted() == (HEADER_BYTES - cut if cut < HEADER_BYTES else 14 - cut)
    assert dec.feed(data[cut:]) == [b"0123456789"]
    assert dec.at_boundary


def test_bytes_wanted_is_a_read_hint() -> None:
    dec = FrameDecoder()
    assert dec.bytes_wanted() == HEADER_BYTES
    dec.feed(frame_header(100) + b"x" * 30)
    assert dec.bytes_wanted() == 70


# ------------------------------------------------------------------------------- oversized
def test_oversized_frame_is_refused_then_stream_resyncs() -> None:
    dec = FrameDecoder(max_frame_bytes=16)
    big = b"B" * 1000
    data = encode_frame(b"before") + encode_frame(big) + encode_frame(b"after")
    out = dec.feed(data)
    assert out == [b"before", OversizedFrame(1000, 16), b"after"]
    assert dec.at_boundary


def test_oversized_frame_refused_before_allocation() -> None:
    """A header announcing 4 GiB is refused at once: nothing of that size is ever buffered."""
    dec = FrameDecoder(max_frame_bytes=1024)
    out = dec.feed(frame_header(0xFFFFFFFF) + b"junk")
    assert out == [OversizedFrame(0xFFFFFFFF, 1024)]
    assert dec.buffered_bytes == 0  # the 4 junk bytes were skipped, not stored
    assert not dec.at_boundary
    assert dec.bytes_wanted() == 0xFFFFFFFF - 4


def test_oversized_frame_refused_when_header_arrives_byte_by_byte() -> None:
    dec = FrameDecoder(max_frame_bytes=10)
    data = encode_frame(b"x" * 11) + encode_frame(b"ok")
    out = _feed_all(dec, [data[i : i + 1] for i in range(len(data))])
    assert out == [OversizedFrame(11, 10), b"ok"]
    assert dec.buffered_bytes == 0
    assert dec.at_boundary


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    dec = FrameDecoder(max_frame_bytes=10)
    assert dec.feed(encode_frame(b"y" * 10)) == [b"y" * 10]


def test_skip_spans_many_feeds() -> None:
    dec = FrameDecoder(max_frame_bytes=8)
    data = encode_frame(b"z" * 500) + encode_frame(b"next")
    out = _feed_all(dec, [data[i : i + 37] for i in range(0, len(data), 37)])
    assert out == [OversizedFrame(500, 8), b"next"]


# ------------------------------------------------------------------------------- garbage
def test_garbage_is_read_as_a_length_and_refused() -> None:
    """Text where a header should be announces a huge frame: refused, never allocated."""
    dec = FrameDecoder(max_frame_bytes=1 << 20)
    out = dec.feed(b"hello world, this is not a frame\n")
    (length,) = struct.unpack(">I", b"hell")
    assert out == [OversizedFrame(length, 1 << 20)]
    assert dec.buffered_bytes == 0


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=2000))
def test_garbage_never_raises_nor_buffers_past_the_limit(garbage: bytes) -> None:
    limit = 256
    dec = FrameDecoder(max_frame_bytes=limit)
    for item in dec.feed(garbage):
        if isinstance(item, OversizedFrame):
            assert item.length > limit
        else:
            assert len(item) <= limit
    assert dec.buffered_bytes <= max(limit, HEADER_BYTES)
