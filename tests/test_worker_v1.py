"""A real echo worker driven as a v1 (DSPEx) host would: JSON, no hello, and every bad input."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest

from mlbridge._protocol.framing import encode_frame, frame_header
from worker_helpers import Spawner, recv_many


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


def _assert_iso(ts: object) -> None:
    assert isinstance(ts, str)
    datetime.fromisoformat(ts)


def _still_serving(w: object, rid: int = 424242) -> None:
    from mlbridge.testing import WorkerProcess

    assert isinstance(w, WorkerProcess)
    w.send({"id": rid, "command": "echo", "args": {"alive": True}})
    reply = w.recv(10)
    assert reply["id"] == rid
    assert reply["result"] == {"alive": True}


# ------------------------------------------------------------------------------- v1 shapes
def test_first_ping_with_id_0_gets_the_dspex_success_envelope(spawn: Spawner) -> None:
    w = spawn()
    w.send({"id": 0, "command": "ping", "args": {}, "timestamp": "2024-05-01T10:00:00.000Z"})
    reply = w.recv()
    assert set(reply) == {"id", "success", "result", "timestamp"}
    assert reply["id"] == 0
    assert reply["success"] is True
    _assert_iso(reply["timestamp"])
    assert reply["result"]["status"] == "ok"
    assert reply["result"]["pid"] == w.proc.pid
    assert reply["result"]["uptime"] >= 0
    assert reply["result"]["mode"] == "standalone"


def test_args_are_optional_and_extra_keys_ignored(spawn: Spawner) -> None:
    w = spawn()
    w.send({"id": 3, "command": "echo", "timestamp": "x", "whatever": [1, 2]})
    reply = w.recv()
    assert reply["id"] == 3
    assert reply["success"] is True
    assert reply["result"] == {}


def test_failure_envelope(spawn: Spawner) -> None:
    w = spawn()
    w.send({"id": 8, "command": "fail", "args": {"type": "ValueError", "message": "bad value"}})
    reply = w.recv()
    assert reply["id"] == 8
    assert reply["success"] is False
    assert reply["error"] == "bad value"
    assert reply["error_type"] == "ValueError"
    assert reply["error_code"] == "unknown"
    _assert_iso(reply["timestamp"])
    assert "ValueError: bad value" in reply["traceback"]
    assert "_fail" in reply["traceback"]  # the handler's own frame
    assert set(reply) == {
        "id",
        "success",
        "error",
        "error_type",
        "error_code",
        "traceback",
        "timestamp",
    }


def test_worker_is_silent_until_asked(spawn: Spawner) -> None:
    w = spawn()
    with pytest.raises(TimeoutError):
        w.recv(0.5)
    assert w.request("ping")["status"] == "ok"


def test_replies_echo_request_ids(spawn: Spawner) -> None:
    w = spawn()
    for rid in (0, 1, 17, 2**40, 5):
        w.send({"id": rid, "command": "echo", "args": {"rid": rid}})
    replies = recv_many(w, 5)
    assert [r["id"] for r in replies] == [0, 1, 17, 2**40, 5]
    assert [r["result"]["rid"] for r in replies] == [0, 1, 17, 2**40, 5]


# ------------------------------------------------------------------------------- namespaces
def test_namespaced_commands(spawn: Spawner) -> None:
    w = spawn()
    assert w.request("common:ping")["status"] == "ok"
    assert w.request("echo:echo", {"x": 1}) == {"x": 1}
    assert w.request("common:get_info")["bridge"] == "echo"


def test_other_namespace_is_a_clear_failure(spawn: Spawner) -> None:
    w = spawn()
    reply = w.request("dspy:echo", {"x": 1}, raw=True)
    assert reply["success"] is False
    assert reply["error_code"] == "unknown_command"
    assert "'dspy'" in reply["error"]
    assert "echo:<cmd>" in reply["error"]
    assert "common:<cmd>" in reply["error"]
    _still_serving(w)


@pytest.mark.parametrize("command", ["dspy:hello", "dspy:cancel", "dspy:ping", "a:b:c"])
def test_runtime_commands_in_another_namespace_are_refused(spawn: Spawner, command: str) -> None:
    w = spawn()
    reply = w.request(command, {"target": 1, "codecs": ["msgpack"]}, raw=True)
    assert reply["success"] is False
    assert reply["error_code"] == "unknown_command"
    assert "namespace" in reply["error"]
    _still_serving(w)  # still JSON: no hello happened


def test_unknown_command(spawn: Spawner) -> None:
    w = spawn()
    reply = w.request("nope", raw=True)
    assert reply["success"] is False
    assert reply["error_code"] == "unknown_command"
    assert "'nope'" in reply["error"]
    assert "echo" in reply["error"]  # lists the known commands
    _still_serving(w)


# ------------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize(
    ("msg", "rid", "fragment"),
    [
        ({"command": "echo"}, 0, "no 'id'"),
        ({"id": "1", "command": "echo"}, 0, "'id' must be an integer"),
        ({"id": 11}, 11, "no 'command'"),
        ({"id": 12, "command": "echo", "args": [1, 2]}, 12, "'args' must be an object"),
        ([1, 2, 3], 0, "must be an object"),
        ("ping", 0, "must be an object"),
    ],
    ids=["no-id", "string-id", "no-command", "args-list", "array", "string"],
)
def test_bad_request_gets_a_failure_naming_the_problem(
    spawn: Spawner, msg: object, rid: int, fragment: str
) -> None:
    w = spawn()
    w.send(msg)
    reply = w.recv()
    assert reply["id"] == rid
    assert reply["success"] is False
    assert reply["error_code"] == "invalid_request"
    assert fragment in reply["error"]
    _still_serving(w)


@pytest.mark.parametrize(
    "payload", [b"{not json", b"\xff\xfe\x00garbage", b""], ids=["json", "utf8", "empty"]
)
def test_undecodable_frame_gets_failure_with_id_0(spawn: Spawner, payload: bytes) -> None:
    w = spawn()
    w.send_bytes(encode_frame(payload))
    reply = w.recv()
    assert reply["id"] == 0
    assert reply["success"] is False
    assert reply["error_code"] == "decode_error"
    assert "JSON" in reply["error"]
    _still_serving(w)


def test_many_bad_frames_each_get_one_reply(spawn: Spawner) -> None:
    w = spawn()
    bad = [encode_frame(b"][")] * 20 + [encode_frame(b'{"id": 5}')] * 20
    w.send_bytes(b"".join(bad))
    replies = recv_many(w, 40)
    assert all(r["success"] is False for r in replies)
    assert [r["id"] for r in replies] == [0] * 20 + [5] * 20
    _still_serving(w)


# ------------------------------------------------------------------------------- oversized
def test_oversized_frame_is_refused_and_the_stream_resyncs(spawn: Spawner) -> None:
    w = spawn(max_frame_bytes=1024)
    big = w.codec.encode({"id": 7, "command": "echo", "args": {"pad": "x" * 5000}})
    w.send_bytes(encode_frame(big) + encode_frame(w.codec.encode({"id": 8, "command": "ping"})))
    refused = w.recv()
    assert refused["id"] == 0
    assert refused["success"] is False
    assert refused["error_code"] == "frame_too_large"
    assert "1024" in refused["error"]
    assert str(len(big)) in refused["error"]
    after = w.recv()
    assert after["id"] == 8
    assert after["success"] is True
    _still_serving(w)


def test_oversized_frame_arriving_slowly(spawn: Spawner) -> None:
    """The refusal comes from the header alone; the body is skipped as it trickles in."""
    w = spawn(max_frame_bytes=100)
    w.send_bytes(frame_header(10_000))
    refused = w.recv()
    assert refused["error_code"] == "frame_too_large"
    for _ in range(10):
        w.send_bytes(b"z" * 1000)
    _still_serving(w)


def test_frame_at_the_limit_is_served(spawn: Spawner) -> None:
    w = spawn(max_frame_bytes=200)
    # a request of exactly the limit is read and served (its reply is small: "pid" ignores
    # the padding; an echo of it would exceed the limit on the way back and be refused)
    payload = w.codec.encode({"id": 1, "command": "pid", "args": {"p": ""}})
    pad = 200 - len(payload)
    payload = w.codec.encode({"id": 1, "command": "pid", "args": {"p": "y" * pad}})
    assert len(payload) == 200
    w.send_bytes(encode_frame(payload))
    assert w.recv()["result"] == w.proc.pid


# ------------------------------------------------------------------------------- stdout
def test_print_and_c_level_writes_do_not_corrupt_the_stream(spawn: Spawner) -> None:
    w = spawn()
    marker = "STRAY-OUTPUT-9f3a"
    for i in range(3):
        assert w.request("print", {"text": f"{marker}-{i}"}) == {"printed": f"{marker}-{i}"}
        _still_serving(w, rid=1000 + i)
    w.close_input()
    assert w.wait(5) == 0
    err = w.stderr_text()
    for i in range(3):
        # once from print(), once from os.write(1), once from the C library's puts()
        assert err.count(f"{marker}-{i}\n") == 3, err


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("type_name", "code"),
    [
        ("RateLimitError", "rate_limit"),
        ("TimeoutError", "timeout"),
        ("InvalidRequestError", "invalid_request"),
        ("ResourceNotFoundError", "resource_not_found"),
        ("KeyError", "unknown"),
        ("AuthenticationError", "invalid_configuration"),
    ],
)
def test_handler_exception_codes(spawn: Spawner, type_name: str, code: str) -> None:
    w = spawn()
    reply = w.request("fail", {"type": type_name, "message": "m"}, raw=True)
    assert reply["success"] is False
    assert reply["error_type"] == type_name
    assert reply["error_code"] == code
    assert f"{type_name}" in reply["traceback"]


def test_unencodable_result_becomes_a_failure(spawn: Spawner) -> None:
    """``bytes`` over JSON: the reply cannot be encoded, so a failure says why (and what to do)."""
    w = spawn()
    reply = w.request("bytes", {"n": 10}, raw=True)
    assert reply["id"] == 1
    assert reply["success"] is False
    assert reply["error_code"] == "unsupported_payload"
    assert "msgpack" in reply["error"]
    _still_serving(w)


# ------------------------------------------------------------------------------- stats
def test_get_stats_shape(spawn: Spawner) -> None:
    w = spawn()
    for i in range(3):
        w.request("echo", {"i": i})
    w.request("fail", raw=True)
    w.request("sleep", {"seconds": 0.05})
    stats = w.request("get_stats")
    assert stats["requests_processed"] == 5
    assert stats["error_count"] == 1
    assert stats["pid"] == w.proc.pid
    assert stats["uptime"] > 0
    assert stats["start_time"] > 1.6e9
    assert stats["rss_bytes"] > 5 * 1024 * 1024
    echo = stats["commands"]["echo"]
    assert echo["count"] == 3
    assert echo["errors"] == 0
    assert echo["mean_ms"] >= 0
    assert stats["commands"]["fail"] == {**stats["commands"]["fail"], "count": 1, "errors": 1}
    assert stats["commands"]["sleep"]["max_ms"] >= 50
    assert stats["commands"]["sleep"]["mean_ms"] >= 50


def test_get_info(spawn: Spawner) -> None:
    w = spawn()
    info = w.request("get_info")
    assert info["framework"]["name"] == "echo"
    assert info["pid"] == w.proc.pid
    assert "echo" in info["commands"]
    assert "create_counter" in info["commands"]
    assert info["resource_types"] == ["counter", "prefixer"]
