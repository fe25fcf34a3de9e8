"""Control while busy (ping, heartbeat, cancel), request ordering, and streaming."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from mlbridge.testing import WorkerProcess
from worker_helpers import Spawner, recv_many, wait_busy


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


@pytest.fixture(params=["json", "msgpack"])
def worker(request: pytest.FixtureRequest, spawn: Spawner) -> WorkerProcess:
    """An echo worker speaking v1 JSON, or msgpack after hello."""
    w = spawn()
    if request.param == "msgpack":
        w.hello("msgpack")
    return w


# ------------------------------------------------------------------------------- ping while busy
@pytest.mark.parametrize("command", ["ping", "common:ping", "heartbeat"])
def test_ping_answered_while_a_long_call_runs(worker: WorkerProcess, command: str) -> None:
    worker.send({"id": 1, "command": "sleep", "args": {"seconds": 1.5}})
    wait_busy(worker, "sleep")
    t0 = time.monotonic()
    worker.send({"id": 2, "command": command})
    first = worker.recv(5)
    assert time.monotonic() - t0 < 0.5
    assert first["id"] == 2
    assert first["success"] is True
    assert first["result"]["status"] == "ok"
    second = worker.recv(10)
    assert second["id"] == 1
    assert second["result"]["slept"] == 1.5


def test_heartbeat_reports_the_running_call(worker: WorkerProcess) -> None:
    idle = worker.request("heartbeat")
    assert idle["busy"] is False
    assert idle["current_command"] is None
    worker.send({"id": 50, "command": "sleep", "args": {"seconds": 30}})
    wait_busy(worker, "sleep")
    worker.send({"id": 51, "command": "heartbeat"})
    beat = worker.recv(5)["result"]
    assert beat["busy"] is True
    assert beat["current_command"] == "sleep"
    assert beat["rss_bytes"] > 0
    worker.send({"id": 52, "command": "cancel", "args": {"target": 50}})
    assert {r["id"] for r in recv_many(worker, 2)} == {50, 52}


def test_ping_answered_while_a_backlog_of_short_calls_runs(worker: WorkerProcess) -> None:
    """No single call is long, but together they keep the main thread away from the pipe."""
    assert worker.request("echo", {"booted": True}) == {"booted": True}
    for i in range(1, 61):
        worker.send({"id": i, "command": "sleep", "args": {"seconds": 0.02}})
    time.sleep(0.1)
    t0 = time.monotonic()
    worker.send({"id": 1000, "command": "ping"})
    replies = []
    while True:
        msg = worker.recv(10)
        replies.append(msg["id"])
        if msg["id"] == 1000:
            break
    assert time.monotonic() - t0 < 0.5
    assert len(replies) < 40  # answered long before the backlog (1.2 s) is done
    replies += [r["id"] for r in recv_many(worker, 61 - len(replies))]
    assert [r for r in replies if r != 1000] == list(range(1, 61))


# ------------------------------------------------------------------------------- cancel
def test_cancel_a_running_call(worker: WorkerProcess) -> None:
    worker.send({"id": 1, "command": "sleep", "args": {"seconds": 60}})
    wait_busy(worker, "sleep")
    t0 = time.monotonic()
    worker.send({"id": 2, "command": "cancel", "args": {"target": 1}})
    ack = worker.recv(5)
    assert ack["id"] == 2
    assert ack["result"] == {"cancelled": True, "target": 1}
    failed = worker.recv(5)
    assert time.monotonic() - t0 < 1.0
    assert failed["id"] == 1
    assert failed["success"] is False
    assert failed["error_code"] == "cancelled"
    assert "cancelled" in failed["error"]
    assert worker.request("echo", {"after": 1}) == {"after": 1}


def test_namespaced_cancel(worker: WorkerProcess) -> None:
    worker.send({"id": 1, "command": "echo:sleep", "args": {"seconds": 60}})
    wait_busy(worker, "echo:sleep")
    worker.send({"id": 2, "command": "common:cancel", "args": {"target": 1}})
    replies = {r["id"]: r for r in recv_many(worker, 2)}
    assert replies[2]["result"]["cancelled"] is True
    assert replies[1]["error_code"] == "cancelled"


def test_cancel_of_an_unknown_call(worker: WorkerProcess) -> None:
    result = worker.request("cancel", {"target": 12345})
    assert result["cancelled"] is False
    assert result["target"] == 12345


def test_queued_requests_run_in_order(worker: WorkerProcess) -> None:
    worker.send({"id": 1, "command": "sleep", "args": {"seconds": 0.3}})
    for i in range(2, 12):
        worker.send({"id": i, "command": "echo", "args": {"i": i}})
    replies = recv_many(worker, 11)
    assert [r["id"] for r in replies] == list(range(1, 12))
    assert all(r["success"] for r in replies)


def test_cancel_of_a_queued_call(worker: WorkerProcess) -> None:
    worker.send({"id": 1, "command": "sleep", "args": {"seconds": 0.5}})
    worker.send({"id": 2, "command": "echo", "args": {"never": True}})
    worker.send({"id": 3, "command": "echo", "args": {"runs": True}})
    worker.send({"id": 4, "command": "cancel", "args": {"target": 2}})
    replies = recv_many(worker, 4)
    assert replies[0]["id"] == 4  # the control thread answers at once
    assert replies[0]["result"]["cancelled"] is True
    assert [r["id"] for r in replies[1:]] == [1, 2, 3]
    assert replies[1]["success"] is True
    assert replies[2]["success"] is False
    assert replies[2]["error_code"] == "cancelled"
    assert "before it ran" in replies[2]["error"]
    assert replies[3]["result"] == {"runs": True}


def test_cancel_after_completion_is_a_no_op(worker: WorkerProcess) -> None:
    assert worker.request("echo", {"a": 1}) == {"a": 1}  # id 1
    assert worker.request("cancel", {"target": 1})["cancelled"] is False


# ------------------------------------------------------------------------------- streaming
def _collect_stream(w: WorkerProcess, rid: int) -> tuple[list[Any], dict[str, Any]]:
    chunks = []
    while True:
        msg = w.recv(10)
        assert msg["id"] == rid
        if "chunk" in msg:
            assert set(msg) == {"id", "chunk"}
            chunks.append(msg["chunk"])
            continue
        return chunks, msg


def test_stream_sends_chunk_frames_then_the_final_reply(worker: WorkerProcess) -> None:
    worker.send({"id": 7, "command": "stream", "args": {"n": 5}, "stream": True})
    chunks, final = _collect_stream(worker, 7)
    assert chunks == [{"index": i} for i in range(5)]
    assert final["success"] is True
    assert final["result"] == {"chunks": 5, "done": True}


def test_chunks_arrive_before_the_generator_finishes(worker: WorkerProcess) -> None:
    worker.send({"id": 7, "command": "stream", "args": {"n": 3, "delay": 0.4}, "stream": True})
    t0 = time.monotonic()
    first = worker.recv(5)
    assert "chunk" in first
    assert time.monotonic() - t0 < 1.0  # the whole stream takes 1.2 s
    chunks, final = _collect_stream(worker, 7)
    assert len(chunks) == 2
    assert final["success"] is True


def test_without_stream_chunks_are_collected_into_the_result(worker: WorkerProcess) -> None:
    assert worker.request("stream", {"n": 4}) == [{"index": i} for i in range(4)]


def test_cancel_during_a_stream_stops_it(worker: WorkerProcess) -> None:
    worker.send(
        {"id": 9, "command": "stream", "args": {"n": 10_000, "delay": 0.01}, "stream": True}
    )
    for _ in range(3):
        assert "chunk" in worker.recv(5)
    worker.send({"id": 10, "command": "cancel", "args": {"target": 9}})
    seen: list[str] = []
    while True:
        msg = worker.recv(5)
        if msg["id"] == 10:
            assert msg["result"]["cancelled"] is True
            seen.append("ack")
        elif "chunk" in msg:
            seen.append("chunk")
        else:
            final = msg
            break
    assert "ack" in seen
    # Chunks already in the pipe when the flag was set still arrive; after the ack, at most
    # the one being produced at that moment.
    after_ack = seen[seen.index("ack") + 1 :]
    assert len(after_ack) <= 1, seen
    assert final["id"] == 9
    assert final["success"] is False, final
    assert final["error_code"] == "cancelled"
    assert worker.request("echo", {"ok": 1}) == {"ok": 1}


def test_large_stream_chunks(worker: WorkerProcess) -> None:
    worker.send({"id": 3, "command": "stream", "args": {"n": 4, "size": 300_000}, "stream": True})
    chunks, final = _collect_stream(worker, 3)
    assert [len(c["data"]) for c in chunks] == [300_000] * 4
    assert final["success"] is True
