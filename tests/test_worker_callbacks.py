"""Calls from a worker back through the host: the test plays the host on the same pipe."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from mlbridge.testing import WorkerProcess
from worker_helpers import Spawner, recv_many


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


@pytest.fixture(params=["msgpack", "json"])
def host(request: pytest.FixtureRequest, spawn: Spawner) -> WorkerProcess:
    """A worker whose 'host' (this test) announced the callbacks capability."""
    w = spawn()
    info = w.hello(request.param, capabilities=["callbacks"])
    assert "callbacks" in info["capabilities"]
    return w


def _expect_callback(w: WorkerProcess, **expected: Any) -> dict[str, Any]:
    msg = w.recv(10)
    assert "cb" in msg, msg
    assert "id" not in msg
    for key, value in expected.items():
        assert msg[key] == value, (key, msg)
    assert isinstance(msg["cb"], int)
    return dict(msg)


def test_call_host_round_trip(host: WorkerProcess) -> None:
    host.send(
        {
            "id": 5,
            "command": "call_host",
            "args": {"bridge": "transformers", "command": "generate", "args": {"prompt": "hi"}},
        }
    )
    cb = _expect_callback(
        host, bridge="transformers", command="generate", args={"prompt": "hi"}, stream=False
    )
    assert cb["timeout"] == 300.0
    host.send({"cb": cb["cb"], "success": True, "result": {"text": "hello there"}})
    reply = host.recv(10)
    assert reply["id"] == 5
    assert reply["success"] is True
    assert reply["result"] == {"text": "hello there"}


def test_callback_ids_are_distinct_and_session_is_forwarded(host: WorkerProcess) -> None:
    seen = []
    for rid in (1, 2):
        host.send(
            {
                "id": rid,
                "command": "call_host",
                "args": {"bridge": "b", "command": "c"},
                "session_id": "sess-1",
            }
        )
        cb = _expect_callback(host, bridge="b", command="c", session_id="sess-1")
        seen.append(cb["cb"])
        host.send({"cb": cb["cb"], "success": True, "result": rid * 10})
        assert host.recv(10)["result"] == rid * 10
    assert seen[0] != seen[1]


def test_streamed_callback(host: WorkerProcess) -> None:
    host.send(
        {
            "id": 6,
            "command": "stream_host",
            "args": {"bridge": "transformers", "command": "generate_stream"},
            "stream": True,
        }
    )
    cb = _expect_callback(host, bridge="transformers", command="generate_stream", stream=True)
    for token in ("Hel", "lo", "!"):
        host.send({"cb": cb["cb"], "chunk": token})
    host.send({"cb": cb["cb"], "success": True, "result": {"tokens": 3}})
    frames = recv_many(host, 4)
    assert frames[:3] == [{"id": 6, "chunk": t} for t in ("Hel", "lo", "!")]
    assert frames[3]["id"] == 6
    assert frames[3]["success"] is True
    assert frames[3]["result"] == {"inner_result": {"tokens": 3}}


def test_streamed_callback_collected_without_stream(host: WorkerProcess) -> None:
    host.send({"id": 6, "command": "stream_host", "args": {"bridge": "x", "command": "y"}})
    cb = _expect_callback(host, stream=True)
    host.send({"cb": cb["cb"], "chunk": 1})
    host.send({"cb": cb["cb"], "chunk": 2})
    host.send({"cb": cb["cb"], "success": True, "result": None})
    reply = host.recv(10)
    assert reply["result"] == [1, 2]


def test_failure_reply_to_a_callback_comes_back_as_a_failure(host: WorkerProcess) -> None:
    host.send(
        {"id": 7, "command": "call_host", "args": {"bridge": "transformers", "command": "gen"}}
    )
    cb = _expect_callback(host)
    host.send(
        {
            "cb": cb["cb"],
            "success": False,
            "error": "model 'tiny' is not loaded",
            "error_type": "OSError",
            "error_code": "model_error",
            "traceback": "Traceback (most recent call last):\n  remote frames\nOSError: tiny\n",
        }
    )
    reply = host.recv(10)
    assert reply["id"] == 7
    assert reply["success"] is False
    assert reply["error_code"] == "model_error"
    assert reply["error_type"] == "OSError"
    assert "transformers:gen: model 'tiny' is not loaded" in reply["error"]
    assert "remote frames" in reply["traceback"]  # the callee's traceback travels too
    assert "_call_host" in reply["traceback"]  # and the caller's


def test_callback_timeout_withdraws_the_call(host: WorkerProcess) -> None:
    host.send(
        {"id": 8, "command": "call_host", "args": {"bridge": "b", "command": "c", "timeout": 0.3}}
    )
    cb = _expect_callback(host, timeout=0.3)
    t0 = time.monotonic()
    withdraw = host.recv(5)
    assert withdraw == {"cb_cancel": cb["cb"]}
    reply = host.recv(5)
    assert time.monotonic() - t0 < 2.0
    assert reply["id"] == 8
    assert reply["error_code"] == "timeout"
    assert "no reply within 0.3s" in reply["error"]
    # a late answer to the withdrawn call is dropped, not confused with anything else
    host.send({"cb": cb["cb"], "success": True, "result": "late"})
    assert host.request("echo", {"fine": True}) == {"fine": True}


def test_ping_and_cancel_while_waiting_on_the_host(host: WorkerProcess) -> None:
    host.send({"id": 9, "command": "call_host", "args": {"bridge": "b", "command": "slow"}})
    cb = _expect_callback(host)
    host.send({"id": 10, "command": "ping"})
    assert host.recv(5)["id"] == 10
    host.send({"id": 11, "command": "cancel", "args": {"target": 9}})
    frames = recv_many(host, 3)
    assert frames[0]["id"] == 11
    assert frames[0]["result"]["cancelled"] is True
    assert {"cb_cancel": cb["cb"]} in frames
    final = next(f for f in frames if f.get("id") == 9)
    assert final["error_code"] == "cancelled"


def test_without_the_capability_callbacks_fail(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")  # no "callbacks" capability announced
    reply = w.request("call_host", {"bridge": "b", "command": "c"}, raw=True)
    assert reply["success"] is False
    assert reply["error_code"] == "callback_error"
    assert "hello" in reply["error"]
    assert w.request("ping")["status"] == "ok"


def test_v1_host_never_sees_a_callback_frame(spawn: Spawner) -> None:
    w = spawn()
    reply = w.request("call_host", {"bridge": "b", "command": "c"}, raw=True)
    assert reply["id"] == 1
    assert reply["error_code"] == "callback_error"


def test_eof_while_waiting_on_the_host(host: WorkerProcess) -> None:
    host.send({"id": 12, "command": "call_host", "args": {"bridge": "b", "command": "c"}})
    _expect_callback(host)
    t0 = time.monotonic()
    host.close_input()
    assert host.wait(5) == 0
    assert time.monotonic() - t0 < 1.0


def test_callback_round_trips_are_prompt(host: WorkerProcess) -> None:
    """While a handler waits on the host, the reply is read at once (not at the next tick)."""
    n = 50
    t0 = time.monotonic()
    for rid in range(1, n + 1):
        host.send({"id": rid, "command": "call_host", "args": {"bridge": "b", "command": "c"}})
        cb = _expect_callback(host)
        host.send({"cb": cb["cb"], "success": True, "result": rid})
        assert host.recv(10)["result"] == rid
    assert time.monotonic() - t0 < 0.4  # ~10 ms each if replies waited for the control tick
