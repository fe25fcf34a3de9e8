"""Request validation and message shapes, sans I/O."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from mlbridge._protocol.messages import (
    CallbackRequest,
    Chunk,
    Failure,
    MessageError,
    Request,
    Success,
    parse_request,
    split_namespace,
    timestamp,
)


def test_parse_minimal_v1_request_ignores_extra_keys() -> None:
    req = parse_request({"id": 0, "command": "ping", "timestamp": "2024-01-01T00:00:00Z"})
    assert req == Request(0, "ping", {}, False, None)


def test_parse_full_request() -> None:
    msg = {"id": 4, "command": "echo:stream", "args": {"n": 2}, "stream": True, "session_id": "s"}
    req = parse_request(msg)
    assert req == Request(4, "echo:stream", {"n": 2}, True, "s")
    assert req.to_wire() == msg


def test_stream_must_be_literally_true() -> None:
    assert parse_request({"id": 1, "command": "x", "stream": "yes"}).stream is False


@pytest.mark.parametrize(
    ("msg", "rid", "fragment"),
    [
        ([1, 2], 0, "must be an object"),
        ("ping", 0, "must be an object"),
        ({"command": "ping"}, 0, "no 'id'"),
        ({"id": -1, "command": "ping"}, 0, "integer >= 0"),
        ({"id": "7", "command": "ping"}, 0, "integer >= 0"),
        ({"id": True, "command": "ping"}, 0, "integer >= 0"),
        ({"id": 1.0, "command": "ping"}, 0, "integer >= 0"),
        ({"id": 5}, 5, "no 'command'"),
        ({"id": 5, "command": ""}, 5, "no 'command'"),
        ({"id": 5, "command": 3}, 5, "no 'command'"),
        ({"id": 6, "command": "x", "args": [1]}, 6, "'args' must be an object"),
        ({"id": 6, "command": "x", "args": "a"}, 6, "'args' must be an object"),
    ],
)
def test_bad_requests_name_the_problem(msg: Any, rid: int, fragment: str) -> None:
    with pytest.raises(MessageError, match=fragment) as info:
        parse_request(msg)
    assert info.value.id == rid


def test_null_args_mean_empty() -> None:
    assert parse_request({"id": 1, "command": "x", "args": None}).args == {}


def test_split_namespace() -> None:
    assert split_namespace("dspy:create_program") == ("dspy", "create_program")
    assert split_namespace("ping") == (None, "ping")
    assert split_namespace("a:b:c") == ("a", "b:c")


def test_timestamp_is_iso8601_utc() -> None:
    ts = datetime.fromisoformat(timestamp())
    assert ts.utcoffset() is not None
    assert ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_reply_shapes() -> None:
    ok = Success(3, {"a": 1}, {"resource_states": {"r": 1}}).to_wire()
    assert ok["id"] == 3
    assert ok["success"] is True
    assert ok["result"] == {"a": 1}
    assert ok["resource_states"] == {"r": 1}
    assert "timestamp" in ok
    bad = Failure(3, "boom", "ValueError", "unknown", "tb").to_wire(key="cb")
    assert bad["cb"] == 3
    assert "id" not in bad
    assert bad["success"] is False
    assert (bad["error"], bad["error_type"], bad["error_code"]) == ("boom", "ValueError", "unknown")
    assert bad["traceback"] == "tb"
    assert Chunk(3, [1]).to_wire() == {"id": 3, "chunk": [1]}


def test_callback_request_round_trip_and_validation() -> None:
    cb = CallbackRequest(2, "transformers", "generate", {"p": "x"}, True, 5.0, "s1")
    assert CallbackRequest.from_wire(cb.to_wire()) == cb
    with pytest.raises(MessageError, match="integer 'cb'"):
        CallbackRequest.from_wire({"bridge": "b", "command": "c"})
    with pytest.raises(MessageError, match="'args' must be an object") as info:
        CallbackRequest.from_wire({"cb": 4, "bridge": "b", "command": "c", "args": []})
    assert info.value.id == 4
