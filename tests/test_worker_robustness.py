"""No input can make the worker die silently or hang: random frames, and a host that goes away."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mlbridge._protocol.framing import encode_frame
from worker_helpers import Spawner, recv_many

SAFE_COMMANDS: list[Any] = [
    "echo",
    "ping",
    "heartbeat",
    "common:ping",
    "echo:echo",
    "get_stats",
    "list_resources",
    "create_counter",
    "execute_resource",
    "delete_resource",
    "cancel",
    "stream",
    "fail",
    "nope",
    "dspy:echo",
    "",
    ":",
    5,
    None,
    ["echo"],
]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.randint(-(2**63), 2**63 - 1)
    if kind == 1:
        return rng.random() * 1e6
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(8)))
    if kind == 3:
        return rng.choice([None, True, False])
    if kind == 4:
        return rng.choice([0, 1, -1, 2**31])
    if kind == 5:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_junk(rng, depth + 1)): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def _random_message(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.15:
        return rng.randbytes(rng.randrange(0, 64))  # not JSON at all
    if roll < 0.25:
        return json.dumps(_junk(rng)).encode()  # JSON, but not a request object
    msg: dict[str, Any] = {}
    if rng.random() < 0.9:
        msg["id"] = rng.choice([rng.randrange(1, 10**6), -1, "7", None, 1.5, True])
    if rng.random() < 0.9:
        msg["command"] = rng.choice(SAFE_COMMANDS)
    if rng.random() < 0.8:
        args = _junk(rng)
        if isinstance(args, dict) and rng.random() < 0.5:
            args = {"n": rng.randrange(0, 4), "target": rng.randrange(0, 5), **args}
        msg["args"] = args
    if rng.random() < 0.2:
        msg["stream"] = rng.choice([True, False, "yes"])
    if rng.random() < 0.2:
        msg["timestamp"] = "2024-01-01T00:00:00Z"
    return json.dumps(msg).encode()


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_frames_each_get_exactly_one_final_reply(spawn: Spawner, seed: int) -> None:
    rng = random.Random(seed)
    w = spawn()
    assert w.request("ping")["status"] == "ok"
    n = 300
    w.send_bytes(b"".join(encode_frame(_random_message(rng)) for _ in range(n)))
    finals = 0
    deadline = time.monotonic() + 60
    while finals < n:
        msg = w.recv(max(1.0, deadline - time.monotonic()))
        assert isinstance(msg, dict)
        assert "id" in msg
        if "chunk" in msg:
            continue
        assert isinstance(msg["success"], bool)
        assert "timestamp" in msg
        if not msg["success"]:
            assert msg["error"]
            assert msg["error_code"]
        finals += 1
    with pytest.raises(TimeoutError):
        w.recv(0.3)  # nothing more: exactly one final reply per frame
    assert w.request("echo", {"still": "here"}, timeout=10) == {"still": "here"}
    assert w.proc.poll() is None


def test_worker_leaves_when_the_host_stops_reading(spawn: Spawner) -> None:
    """Its replies hit a closed pipe: it exits (0) instead of hanging or spinning."""
    w = spawn()
    assert w.request("ping")["status"] == "ok"
    assert w.proc.stdout is not None
    w.proc.stdout.close()
    w.send({"id": 2, "command": "echo", "args": {"x": 1}})
    assert w.wait(5) == 0


def test_interleaved_control_and_work_under_load(spawn: Spawner) -> None:
    """Pings, heartbeats and work sent back to back: every id answered once, work in order."""
    w = spawn()
    w.hello("msgpack")
    frames = []
    for i in range(1, 401):
        command = "ping" if i % 3 == 0 else "echo"
        frames.append(encode_frame(w.codec.encode({"id": i, "command": command, "args": {}})))
    w.send_bytes(b"".join(frames))
    replies = recv_many(w, 400, timeout=30)
    assert sorted(r["id"] for r in replies) == list(range(1, 401))
    work_ids = [r["id"] for r in replies if r["id"] % 3 != 0]
    assert work_ids == sorted(work_ids)
