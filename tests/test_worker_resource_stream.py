"""Streaming resources: ``execute_resource`` with ``"stream": true`` on a type with ``stream``.

A real echo worker, raw frames. Its ``counter`` type has ``stream`` (count up ``n`` steps, one
chunk per step, the generator's return value is the final result) and ``dump_state``; its
``prefixer`` type has only ``execute``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mlbridge.testing import WorkerProcess
from worker_helpers import Spawner


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


def _until_final(w: WorkerProcess, rid: int, timeout: float = 10.0) -> tuple[list[Any], Any]:
    """The chunks of call ``rid`` and its final reply (other ids are kept aside)."""
    chunks: list[Any] = []
    others: list[Any] = []
    while True:
        msg = w.recv(timeout)
        if msg.get("id") != rid:
            others.append(msg)
            continue
        if "chunk" in msg:
            chunks.append(msg["chunk"])
            continue
        return chunks, {**msg, "_others": others}


def test_stream_yields_chunks_then_the_return_value_and_reports_state(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    rid = w.request("create_counter", {"config": {"start": 10, "step": 2}})["resource_id"]
    w.send(
        {
            "id": 50,
            "command": "execute_resource",
            "args": {"resource_id": rid, "inputs": {"n": 3}},
            "stream": True,
        }
    )
    chunks, final = _until_final(w, 50)
    assert chunks == [{"value": 12}, {"value": 14}, {"value": 16}]
    assert final["success"] is True
    assert final["result"] == {"value": 16, "steps": 3, "pid": w.proc.pid}
    assert final["resource_states"] == {rid: {"value": 16}}
    summary = w.request("get_resource", {"resource_id": rid})
    assert summary["execution_count"] == 1 and summary["last_executed"] is not None
    assert summary["value"] == 16

    # Without "stream": true the same type runs `execute` as before.
    reply = w.request("execute_resource", {"resource_id": rid, "inputs": {}}, raw=True)
    assert reply["result"]["value"] == 18
    assert reply["resource_states"] == {rid: {"value": 18}}


def test_stream_on_a_type_without_stream_falls_back_to_execute(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    rid = w.request("create_prefixer", {"config": {"prefix": ">> "}})["resource_id"]
    w.send(
        {
            "id": 60,
            "command": "execute_resource",
            "args": {"resource_id": rid, "inputs": {"text": "hi"}},
            "stream": True,
        }
    )
    chunks, final = _until_final(w, 60)
    assert chunks == []
    assert final["success"] is True and final["result"] == {"text": ">> hi"}
    assert "resource_states" not in final  # the type has no dump_state


def test_cancelled_stream_reports_no_state_and_no_execution(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    rid = w.request("create_counter", {"config": {"start": 0}})["resource_id"]
    w.send(
        {
            "id": 70,
            "command": "execute_resource",
            "args": {"resource_id": rid, "inputs": {"n": 500, "delay": 0.01}},
            "stream": True,
        }
    )
    first = w.recv(10)
    assert first == {"id": 70, "chunk": {"value": 1}}
    w.send({"id": 71, "command": "cancel", "args": {"target": 70}})
    chunks, final = _until_final(w, 70)
    assert len(chunks) < 499
    assert final["success"] is False and final["error_code"] == "cancelled"
    assert "resource_states" not in final
    cancel_reply = next(m for m in final["_others"] if m.get("id") == 71)
    assert cancel_reply["result"]["cancelled"] is True
    summary = w.request("get_resource", {"resource_id": rid})
    assert summary["execution_count"] == 0


def test_stream_over_v1_json_carries_no_state_key(spawn: Spawner) -> None:
    w = spawn()  # no hello: a v1 (DSPEx) host
    rid = w.request("create_counter", {"config": {"start": 1}})["resource_id"]
    w.send(
        {
            "id": 80,
            "command": "execute_resource",
            "args": {"resource_id": rid, "inputs": {"n": 2}},
            "stream": True,
        }
    )
    chunks, final = _until_final(w, 80)
    assert chunks == [{"value": 2}, {"value": 3}]
    assert final["result"]["value"] == 3
    assert set(final) == {"id", "success", "result", "timestamp", "_others"}
