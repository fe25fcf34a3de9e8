"""The LangChain bridge in one real worker process, spoken to frame by frame: cancel of a running
chain, an agent's tool loop and a stream (the reply is ``cancelled`` and nothing runs after it),
and the default local model's clear error when no host can serve it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_helpers import fake_list, lc_env, tool_call
from mlbridge.testing import WorkerProcess
from worker_helpers import Spawner, wait_busy

pytestmark = [pytest.mark.langchain, pytest.mark.timeout(120)]


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


def create(w: WorkerProcess, kind: str, config: dict[str, Any], rid: str) -> dict[str, Any]:
    return dict(w.request(f"create_{kind}", {"resource_id": rid, "config": config}))


def send_execute(w: WorkerProcess, call_id: int, rid: str, inputs: Any, stream: bool) -> None:
    msg: dict[str, Any] = {
        "id": call_id,
        "command": "execute_resource",
        "args": {"resource_id": rid, "inputs": inputs},
    }
    if stream:
        msg["stream"] = True
    w.send(msg)


def cancel_and_collect(w: WorkerProcess, target: int) -> tuple[dict[str, Any], int, float]:
    """Send ``cancel``; return (the target's final reply, chunks after the cancel, seconds)."""
    t0 = time.monotonic()
    w.send({"id": target + 1, "command": "cancel", "args": {"target": target}})
    final: dict[str, Any] | None = None
    chunks = 0
    while final is None:
        frame = w.recv(10)
        if frame["id"] == target and "chunk" in frame:
            chunks += 1
        elif frame["id"] == target:
            final = frame
    return final, chunks, time.monotonic() - t0


def test_cancel_stops_a_running_chain_at_its_next_step(spawn: Spawner, tmp_path: Path) -> None:
    marker = tmp_path / "steps.txt"
    w = spawn("langchain", env=lc_env({"MLBRIDGE_TEST_MARKER": str(marker)}))
    w.hello("msgpack")
    config = {"factory": "langchain_helpers:slow_steps", "kwargs": {"steps": 10, "delay_s": 0.5}}
    create(w, "chain", config, "slow")
    send_execute(w, 5, "slow", {"x": 1}, stream=False)
    wait_busy(w, "execute_resource")
    deadline = time.monotonic() + 10
    while not marker.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    final, _, seconds = cancel_and_collect(w, 5)
    assert final["success"] is False and final["error_code"] == "cancelled", final
    assert seconds < 3.0  # the whole chain would take 5 s
    time.sleep(1.0)  # a step still running would have written its marker line by now
    assert marker.read_text().count("step") <= 2
    assert w.request("ping")["status"] == "ok"


def test_cancel_stops_an_agent_before_its_next_tool(spawn: Spawner, tmp_path: Path) -> None:
    marker = tmp_path / "tool-runs.txt"
    w = spawn("langchain", env=lc_env({"MLBRIDGE_TEST_MARKER": str(marker)}))
    w.hello("json")
    turns = [
        {"content": "", "tool_calls": [tool_call("slow_add", {"a": 1, "b": i}, f"c{i}")]}
        for i in range(5)
    ] + ["done"]
    llm = {"class": "langchain_helpers:ToolCallingFakeModel", "kwargs": {"turns": turns}}
    create(w, "agent", {"llm": llm, "tools": ["langchain_helpers:slow_add"]}, "agent")
    send_execute(w, 7, "agent", {"input": "add"}, stream=False)
    deadline = time.monotonic() + 20
    while not marker.exists():  # the first (one-second) tool call is running
        assert time.monotonic() < deadline
        time.sleep(0.02)
    final, _, seconds = cancel_and_collect(w, 7)
    assert final["success"] is False and final["error_code"] == "cancelled", final
    assert seconds < 3.0
    assert marker.read_text().count("ran") == 1  # no tool ran after the cancel


def test_cancel_mid_stream_ends_it_at_the_next_chunk(spawn: Spawner) -> None:
    w = spawn("langchain", env=lc_env())
    w.hello("msgpack")
    create(w, "chain", {"prompt": "{q}", "llm": fake_list(["y" * 100], sleep=0.05)}, "s")
    send_execute(w, 9, "s", {"q": "go"}, stream=True)
    first = w.recv(20)
    assert first["id"] == 9 and first["chunk"] == "y"
    final, after, seconds = cancel_and_collect(w, 9)
    assert final["success"] is False and final["error_code"] == "cancelled", final
    assert after < 20 and seconds < 2.0  # 100 chunks, 5 s, had it gone on
    done = w.request("execute_resource", {"resource_id": "s", "inputs": {"q": "again"}})
    assert done == "y" * 100


def test_default_local_model_without_a_host_is_a_clear_error(spawn: Spawner) -> None:
    w = spawn("langchain", env=lc_env())
    w.hello("msgpack")  # no "callbacks" capability: this worker cannot call back
    create(w, "chain", {"prompt": "{q}"}, "local")  # no llm: the local model
    reply = w.request("execute_resource", {"resource_id": "local", "inputs": {"q": "hi"}}, raw=True)
    assert reply["success"] is False and reply["error_code"] == "callback_error"
    assert "local:smollm2" in reply["error"] and "'llm' spec" in reply["error"]
    info = w.request("get_info")
    assert info["framework"]["name"] == "langchain"
    assert info["resource_types"] == ["agent", "chain"]


def test_the_llm_setting_is_the_model_of_chains_that_give_none(spawn: Spawner) -> None:
    w = spawn("langchain", settings={"llm": fake_list(["from the setting"])}, env=lc_env())
    w.hello("msgpack")
    create(w, "chain", {"prompt": "{q}"}, "c")
    assert w.request("execute_resource", {"resource_id": "c", "inputs": {"q": "?"}}) == (
        "from the setting"
    )
    info = w.request("get_info")["framework"]
    assert info["default_llm"]["class"] == "langchain_core.language_models:FakeListChatModel"
    bad = spawn("langchain", settings={"llm": {"temperature": "hot"}}, env=lc_env())
    assert bad.wait(60) != 0  # a bad setting fails the boot, saying which
    assert "settings.llm" in bad.stderr_text()


def test_without_the_langchain_package_agents_and_providers_say_what_to_install(
    spawn: Spawner, tmp_path: Path
) -> None:
    shadow = tmp_path / "shadow" / "langchain"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('langchain is hidden for this test')\n")
    env = lc_env()
    env["PYTHONPATH"] = os.pathsep.join([str(shadow.parent), env["PYTHONPATH"]])
    w = spawn("langchain", env=env)
    w.hello("msgpack")  # langchain_core alone is enough for the bridge and its chains
    create(w, "chain", {"prompt": "{q}", "llm": fake_list(["core only"])}, "c")
    assert w.request("execute_resource", {"resource_id": "c", "inputs": {"q": "?"}}) == "core only"
    for kind, config in (
        ("agent", {"llm": fake_list(["x"]), "tools": []}),
        ("chain", {"prompt": "{q}", "llm": {"provider": "openai", "model": "gpt-4o-mini"}}),
    ):
        reply = w.request(f"create_{kind}", {"config": config}, raw=True)
        assert reply["error_code"] == "invalid_configuration", reply
        assert "install the 'langchain' package" in reply["error"]
