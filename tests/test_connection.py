"""The host's sans-I/O connection: calls in -> bytes out, bytes in -> events, byte by byte."""

from __future__ import annotations

from typing import Any

import pytest

from mlbridge._host.connection import Connection
from mlbridge._protocol.codec import JsonCodec, MsgpackCodec
from mlbridge._protocol.framing import FrameDecoder, encode_frame
from mlbridge.errors import ProtocolError


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []

    def on_reply(self, rid: int, msg: dict[str, Any]) -> None:
        self.log.append(("reply", (rid, msg)))

    def on_chunk(self, rid: int, chunk: Any) -> None:
        self.log.append(("chunk", (rid, chunk)))

    def on_callback(self, msg: dict[str, Any]) -> None:
        self.log.append(("callback", msg))

    def on_callback_cancel(self, cb: Any) -> None:
        self.log.append(("cb_cancel", cb))

    def on_stray(self, msg: Any) -> None:
        self.log.append(("stray", msg))

    def on_fatal(self, reason: str) -> None:
        self.log.append(("fatal", reason))


def test_requests_are_typed_frames_with_fresh_ids() -> None:
    c = Connection(1 << 20)
    ids = [c.next_id() for _ in range(3)]
    assert ids == [1, 2, 3]  # never 0: the v1 wire's "unreadable frame" id
    header, payload = c.request(4, "echo", {"a": 1}, stream=True, session_id="s1")
    frames = FrameDecoder().feed(header + payload)
    assert JsonCodec().decode(frames[0]) == {
        "id": 4,
        "command": "echo",
        "args": {"a": 1},
        "stream": True,
        "session_id": "s1",
    }
    c.use_codec("msgpack")
    header, payload = c.cancel(9)
    msg = MsgpackCodec().decode(FrameDecoder().feed(header + payload)[0])
    assert msg["command"] == "cancel" and msg["args"] == {"target": 9}


def test_oversized_request_is_refused_before_sending() -> None:
    c = Connection(100)
    with pytest.raises(ProtocolError, match="max_frame_bytes=100"):
        c.request(1, "echo", {"x": "y" * 200})


def test_replies_chunks_callbacks_byte_by_byte() -> None:
    codec = JsonCodec()
    wire = b"".join(
        encode_frame(codec.encode(m))
        for m in (
            {"id": 1, "chunk": {"i": 0}},
            {"id": 1, "success": True, "result": 5},
            {"cb": 3, "bridge": "b", "command": "x", "args": {}},
            {"cb_cancel": 3},
            {"id": 0, "success": False, "error": "could not read"},
            [1, 2],
        )
    )
    c = Connection(1 << 20)
    ev = Events()
    for i in range(len(wire)):
        c.receive(wire[i : i + 1], ev)
    kinds = [k for k, _ in ev.log]
    assert kinds == ["chunk", "reply", "callback", "cb_cancel", "stray", "stray"]
    assert ev.log[1][1] == (1, {"id": 1, "success": True, "result": 5})
    assert ev.log[4][1]["error"] == "could not read"  # id 0 is never a reply to us


def test_garbage_and_oversized_frames_are_fatal() -> None:
    hello = encode_frame(JsonCodec().encode({"id": 1, "success": True, "result": {}}))
    ev = Events()
    Connection(1 << 20).receive(hello + encode_frame(b"\xff not json"), ev)
    assert ev.log[1][0] == "fatal" and "undecodable" in ev.log[1][1]
    ev = Events()
    Connection(1000).receive(hello + (10_000).to_bytes(4, "big") + b"x" * 20, ev)
    assert ev.log[1][0] == "fatal" and "max_frame_bytes=1000" in ev.log[1][1]


def test_bytes_printed_before_the_first_frame_are_shown_not_taken_as_a_length() -> None:
    ev = Events()
    Connection(1 << 20).receive(b"hello from sitecustomize\n", ev)
    kind, reason = ev.log[0]
    assert kind == "fatal"
    assert "non-protocol bytes" in reason and "hello from sitecustomize" in reason
    assert "stderr" in reason


def test_callback_reply_that_cannot_be_encoded_becomes_a_failure() -> None:
    c = Connection(1 << 20)
    _header, payload = c.callback_reply({"cb": 2, "success": True, "result": b"\x00raw"})
    msg = JsonCodec().decode(payload)
    assert msg["cb"] == 2 and msg["success"] is False and msg["error_code"]
