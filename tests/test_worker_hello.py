"""``hello`` (codec and version negotiation), binary payloads, and the resource store."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import numpy as np
import orjson
import pytest

from mlbridge._protocol.framing import FrameDecoder, encode_frame
from mlbridge.testing import WorkerProcess
from worker_helpers import Spawner


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


def _raw_reply(w: WorkerProcess, payload: bytes) -> bytes:
    """Send one already-encoded frame and return the reply's raw payload bytes."""
    import os
    import select

    w.send_bytes(encode_frame(payload))
    assert w.proc.stdout is not None
    fd = w.proc.stdout.fileno()
    dec = FrameDecoder()
    while True:
        ready, _, _ = select.select([fd], [], [], 10)
        assert ready, "no reply"
        frames = dec.feed(os.read(fd, 1 << 20))
        if frames:
            assert len(frames) == 1
            frame = frames[0]
            assert isinstance(frame, bytes)
            return frame


# ------------------------------------------------------------------------------- hello
def test_hello_switches_both_directions_to_msgpack(spawn: Spawner) -> None:
    w = spawn()
    raw = _raw_reply(
        w,
        orjson.dumps(
            {"id": 1, "command": "hello", "args": {"protocol_version": 2, "codecs": ["msgpack"]}}
        ),
    )
    reply = orjson.loads(raw)  # the hello reply itself is still JSON
    assert reply["success"] is True
    info = reply["result"]
    assert info["codec"] == "msgpack"
    assert info["protocol_version"] == 2
    assert info["pid"] == w.proc.pid
    assert info["framework"] == {
        "name": "echo",
        "version": "1.0",
        "description": "test bridge, no framework",
    }
    assert info["bridge"] == "echo"
    assert info["max_frame_bytes"] == 64 * 1024 * 1024
    for cap in ("streaming", "cancel", "heartbeat", "callbacks", "binary", "resource_states"):
        assert cap in info["capabilities"]
    # now both directions are MessagePack: a msgpack request gets a msgpack reply
    raw = _raw_reply(w, msgpack.packb({"id": 2, "command": "echo", "args": {"b": b"\x00\xff"}}))
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    reply = msgpack.unpackb(raw)
    assert reply["id"] == 2
    assert reply["result"] == {"b": b"\x00\xff"}
    assert isinstance(reply["timestamp"], str)


def test_json_request_after_msgpack_hello_is_undecodable(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    raw = _raw_reply(w, orjson.dumps({"id": 3, "command": "ping"}))
    reply = msgpack.unpackb(raw)
    # '{' is a valid msgpack fixmap header, so the JSON text decodes as garbage or fails:
    # either way it cannot be a successful ping.
    assert reply.get("success") is False


def test_hello_json_keeps_json(spawn: Spawner) -> None:
    w = spawn()
    info = w.hello("json")
    assert info["codec"] == "json"
    raw = _raw_reply(w, orjson.dumps({"id": 9, "command": "echo", "args": {"x": 1}}))
    assert orjson.loads(raw)["result"] == {"x": 1}


def test_hello_picks_the_first_supported_codec(spawn: Spawner) -> None:
    w = spawn()
    info = w.request("hello", {"codecs": ["cbor", "msgpack", "json"]})
    assert info["codec"] == "msgpack"


def test_hello_single_codec_key_and_older_version(spawn: Spawner) -> None:
    w = spawn()
    info = w.request("hello", {"codec": "json", "protocol_version": 1})
    assert info["codec"] == "json"
    assert info["protocol_version"] == 1


def test_hello_with_no_supported_codec_fails_and_keeps_json(spawn: Spawner) -> None:
    w = spawn()
    reply = w.request("hello", {"codecs": ["cbor"]}, raw=True)
    assert reply["success"] is False
    assert reply["error_code"] == "invalid_request"
    assert "cbor" in reply["error"]
    assert w.request("echo", {"still": "json"}) == {"still": "json"}


@pytest.mark.parametrize(
    "args",
    [
        {"protocol_version": "two", "codecs": ["msgpack"]},
        {"protocol_version": None},
        {"codecs": 5},
        {"codecs": "msgpack"},
        {"capabilities": 3},
    ],
    ids=["version-str", "version-null", "codecs-int", "codecs-str", "caps-int"],
)
def test_malformed_hello_is_a_failure_not_a_dead_worker(
    spawn: Spawner, args: dict[str, object]
) -> None:
    w = spawn()
    reply = w.request("hello", args, raw=True)
    assert reply["id"] == 1
    assert reply["success"] is False
    assert reply["error_code"] == "invalid_request"
    assert w.request("echo", {"alive": 1}) == {"alive": 1}  # still JSON, still serving


# ------------------------------------------------------------------------------- binary
def test_bytes_over_msgpack(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    out = w.request("bytes", {"n": 1001})
    assert isinstance(out, bytes)
    assert len(out) == 1001
    blob = bytes(range(256)) * 1000
    assert w.request("echo", {"blob": blob}) == {"blob": blob}


def test_big_binary_payload_round_trip(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    blob = np.random.default_rng(0).bytes(8 * 1024 * 1024)
    assert w.request("echo", {"blob": blob}, timeout=60)["blob"] == blob


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(10, dtype=np.int8),
        np.ones((2, 2, 2), dtype=np.float64).T,
    ],
    ids=["f32", "i8", "f64-transposed"],
)
def test_numpy_arrays_over_msgpack(spawn: Spawner, arr: np.ndarray) -> None:
    w = spawn()
    w.hello("msgpack")
    out = w.request("echo", {"arr": arr, "nested": [arr, {"again": arr}]})
    for got in (out["arr"], out["nested"][0], out["nested"][1]["again"]):
        assert isinstance(got, np.ndarray)
        assert got.dtype == arr.dtype
        assert got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)


def test_bytes_over_json_fail_with_unsupported_payload(spawn: Spawner) -> None:
    w = spawn()
    w.hello("json")
    reply = w.request("bytes", {"n": 8}, raw=True)
    assert reply["success"] is False
    assert reply["error_code"] == "unsupported_payload"
    assert "msgpack" in reply["error"]
    assert "base64" in reply["error"]
    assert w.request("ping")["status"] == "ok"


# ------------------------------------------------------------------------------- resources
def test_resource_lifecycle(spawn: Spawner) -> None:
    w = spawn()
    created = w.request("create_counter", {"config": {"start": 5, "step": 2}})
    rid = created["resource_id"]
    assert created["status"] == "created"
    assert created["type"] == "counter"
    assert created["value"] == 5
    assert rid.startswith("counter_")
    assert w.request("execute_resource", {"resource_id": rid, "inputs": {}})["value"] == 7
    assert w.request("execute_resource", {"resource_id": rid, "inputs": {"by": 10}})["value"] == 17

    w.request("create_prefixer", {"resource_id": "p1", "config": {"prefix": ">> "}})
    assert w.request("execute_resource", {"resource_id": "p1", "inputs": {"text": "hi"}}) == {
        "text": ">> hi"
    }

    counters = w.request("list_counters")
    assert counters["total_count"] == 1
    assert counters["resources"][0]["id"] == rid
    assert counters["resources"][0]["execution_count"] == 2
    everything = w.request("list_resources")
    assert {r["id"] for r in everything["resources"]} == {rid, "p1"}
    assert w.request("list_resources", {"type": "prefixer"})["total_count"] == 1

    assert w.request("delete_resource", {"resource_id": rid}) == {
        "resource_id": rid,
        "status": "deleted",
    }
    gone = w.request("execute_resource", {"resource_id": rid}, raw=True)
    assert gone["success"] is False
    assert gone["error_code"] == "resource_not_found"
    again = w.request("delete_resource", {"resource_id": rid}, raw=True)
    assert again["error_code"] == "resource_not_found"
    assert w.request("delete_resource", {"resource_id": rid, "missing_ok": True})["status"] == (
        "absent"
    )
    assert w.request("list_counters")["total_count"] == 0


def test_create_from_saved_state_and_explicit_id(spawn: Spawner) -> None:
    w = spawn()
    out = w.request("create_counter", {"resource_id": "c9", "config": {}, "state": {"value": 41}})
    assert out["resource_id"] == "c9"
    assert w.request("execute_resource", {"resource_id": "c9"})["value"] == 42


def test_resource_states_follow_the_reply_after_hello(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    rid = w.request("create_counter", {"config": {"start": 1}})["resource_id"]
    reply = w.request("execute_resource", {"resource_id": rid, "inputs": {}}, raw=True)
    assert reply["success"] is True
    assert reply["resource_states"] == {rid: {"value": 2}}
    plain = w.request("echo", {}, raw=True)
    assert "resource_states" not in plain


def test_no_resource_states_for_a_v1_host(spawn: Spawner) -> None:
    w = spawn()
    rid = w.request("create_counter", {"config": {}})["resource_id"]
    reply = w.request("execute_resource", {"resource_id": rid}, raw=True)
    assert set(reply) == {"id", "success", "result", "timestamp"}


def test_session_resources(spawn: Spawner) -> None:
    w = spawn()
    w.request("create_counter", {"resource_id": "a"}, session_id="s1")
    w.request("create_counter", {"resource_id": "b", "session_id": "s2"})
    w.request("create_counter", {"resource_id": "c"})
    assert [r["id"] for r in w.request("list_counters", {"session_id": "s1"})["resources"]] == ["a"]
    assert w.request("session", session_id="s7") == "s7"


def test_bad_create_config(spawn: Spawner) -> None:
    w = spawn()
    reply = w.request("create_counter", {"config": [1]}, raw=True)
    assert reply["error_code"] == "invalid_request"
    assert "'config' must be an object" in reply["error"]


# ------------------------------------------------------------------ unreadable ids after hello
def test_unreadable_frames_are_marked_after_hello_and_id_0_on_the_v1_wire(spawn: Spawner) -> None:
    from mlbridge._protocol.framing import encode_frame

    v1 = spawn()
    v1.send_bytes(encode_frame(b"\xff not json"))
    reply = v1.recv()
    assert reply["id"] == 0 and reply["success"] is False and "unreadable" not in reply

    w = spawn()
    w.hello("json")
    for bad in (b"\xff not json", b'{"command": "ping"}', b'{"id": "x", "command": "ping"}'):
        w.send_bytes(encode_frame(bad))
        reply = w.recv()
        assert reply["id"] is None and reply["unreadable"] is True, reply
        assert reply["success"] is False and reply["error"]
    # a request whose id is 0 is still answered as id 0, and is not confused with the above
    w.send({"id": 0, "command": "echo", "args": {"x": 1}})
    reply = w.recv()
    assert reply["id"] == 0 and reply["result"] == {"x": 1}
