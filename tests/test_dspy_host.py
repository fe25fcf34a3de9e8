"""The DSPy bridge through ``MLBridge``: host-owned programs, parity with DSPy in-process, batch
spread over the pool through call-backs, and a replacement worker after ``kill -9``."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dspy")

import dspy
from dspy.utils.dummies import DummyLM

from dspy_helpers import QAWithContext, add, dspy_env, dummy, run_in_process
from host_helpers import wait_until
from mlbridge import BridgeConfig, BridgeOptions, MLBridge, MLBridgeConfig, errors

pytestmark = pytest.mark.dspy

QUESTIONS = {f"question {i}": {"answer": f"answer {i}"} for i in range(6)}


def dspy_config(tmp: Path, *, pool_size: int, overflow: int = 0, **settings: Any) -> BridgeConfig:
    return BridgeConfig(
        "dspy",
        python_module="dspy",
        pool_size=pool_size,
        overflow=overflow,
        env=dspy_env(tmp),
        settings=settings,
        options=BridgeOptions(timeout=60.0, startup_timeout=60.0, health_check_interval=1.0),
    )


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLBridge]:
    tmp = tmp_path_factory.mktemp("dspy-host")
    cfg = MLBridgeConfig(bridges={"dspy": dspy_config(tmp, pool_size=3)}, default_bridge="dspy")
    with MLBridge(cfg, env_overrides=False) as b:
        yield b


def _pids(b: MLBridge) -> list[int]:
    return sorted(int(w["pid"]) for w in b.statistics()["pools"]["dspy"]["workers"])


REACT_ANSWERS = [
    {"next_thought": "add", "next_tool_name": "add", "next_tool_args": {"a": 20, "b": 22}},
    {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
    {"reasoning": "the tool said 42", "answer": "42"},
]
CASES: dict[str, tuple[dict[str, Any], Any, list[Any], dict[str, Any]]] = {
    "predict": (
        {"signature": "question -> answer"},
        lambda: dspy.Predict("question -> answer"),
        [{"answer": "Paris"}],
        {"question": "Capital of France?"},
    ),
    "chain_of_thought": (
        {"signature": "question -> answer", "program_type": "chain_of_thought"},
        lambda: dspy.ChainOfThought("question -> answer"),
        [{"reasoning": "it is well known", "answer": "Paris"}],
        {"question": "Capital of France?"},
    ),
    "react": (
        {"signature": "question -> answer", "program_type": "react", "tools": ["dspy_helpers:add"]},
        lambda: dspy.ReAct("question -> answer", tools=[add]),
        REACT_ANSWERS,
        {"question": "20 + 22?"},
    ),
    "module": (
        {"module": "dspy_helpers:QAWithContext", "module_kwargs": {"style": "brief"}},
        lambda: QAWithContext(style="brief"),
        [{"context": "Paris is in France"}, {"reasoning": "r", "answer": "Paris"}],
        {"question": "Where is Paris?"},
    ),
    "typed": (
        {"signature": "question -> total: int, parts: list[int], even: bool"},
        lambda: dspy.Predict("question -> total: int, parts: list[int], even: bool"),
        [{"total": 6, "parts": [1, 2, 3], "even": True}],
        {"question": "1+2+3"},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_program_through_mlbridge_matches_dspy_in_process(bridge: MLBridge, case: str) -> None:
    config, make, answers, inputs = CASES[case]
    expected = run_in_process(make(), DummyLM(answers), **inputs)
    rid = bridge.create_resource("dspy", "program", {**config, "lm": dummy(answers)})
    result = bridge.execute_resource("dspy", rid, inputs)
    assert result["outputs"] == expected
    assert set(result["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    bridge.delete_resource("dspy", rid)


def test_batch_is_spread_over_the_pool_and_matches_in_process(bridge: MLBridge) -> None:
    reference = dspy.Predict("question -> answer")
    lm = DummyLM(QUESTIONS)
    batch = [{"question": q} for q in QUESTIONS]
    expected = [run_in_process(reference, lm, **item) for item in batch]
    rid = bridge.create_resource(
        "dspy", "program", {"signature": "question -> answer", "lm": dummy(QUESTIONS)}
    )
    result = bridge.execute_resource("dspy", rid, {"batch": batch})
    assert [r["outputs"] for r in result["results"]] == expected
    assert result["count"] == len(batch)
    assert len(result["workers"]) >= 2, result["workers"]  # other workers took items
    worker_ids = {w["id"] for w in bridge.statistics()["pools"]["dspy"]["workers"]}
    assert set(result["workers"]) <= worker_ids


def test_batch_on_a_pool_of_one_runs_in_that_worker(tmp_path: Path) -> None:
    # The worker's hand-offs are refused (no other worker, no overflow): it runs every item.
    cfg = MLBridgeConfig(
        bridges={"dspy": dspy_config(tmp_path, pool_size=1)}, default_bridge="dspy"
    )
    with MLBridge(cfg, env_overrides=False) as b:
        rid = b.create_resource(
            "dspy", "program", {"signature": "question -> answer", "lm": dummy(QUESTIONS)}
        )
        batch = [{"question": q} for q in QUESTIONS]
        result = b.execute_resource("dspy", rid, {"batch": batch})
        assert [r["outputs"] for r in result["results"]] == list(QUESTIONS.values())
        assert len(result["workers"]) == 1


def test_program_is_rebuilt_on_a_replacement_after_kill_9(bridge: MLBridge) -> None:
    rid = bridge.create_resource(
        "dspy", "program", {"signature": "question -> answer", "lm": dummy(QUESTIONS)}
    )
    first = bridge.execute_resource("dspy", rid, {"question": "question 3"})
    before = _pids(bridge)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(
        lambda: len(_pids(bridge)) == 3 and not set(_pids(bridge)) & set(before), 60
    ), "the pool did not replace its workers"
    again = bridge.execute_resource("dspy", rid, {"question": "question 3"})
    assert again["outputs"] == first["outputs"] == {"answer": "answer 3"}
    listed = [r for r in bridge.list_resources("dspy", "program") if r["resource_id"] == rid]
    assert listed[0]["execution_count"] == 2


def test_dspex_commands_through_execute_and_errors_keep_their_kind(bridge: MLBridge) -> None:
    with bridge.session("dspy") as s:
        s.execute("configure_lm", dummy([{"answer": "yes"}] * 10))
        created = s.execute("create_program", {"id": "yesno", "signature": "question -> answer"})
        assert created["program_id"] == "yesno"
        out = s.execute("execute_program", {"program_id": "yesno", "inputs": {"question": "?"}})
        assert out["outputs"] == {"answer": "yes"}
    with pytest.raises(errors.InvalidConfigurationError, match="exactly one '->'"):
        bridge.create_resource("dspy", "program", {"signature": "no arrow"})
    with pytest.raises(errors.InvalidConfigurationError) as info:
        bridge.execute("dspy", "configure_lm", {"model": "openai/x", "temperature": "hot"})
    assert info.value.kind == "invalid_configuration"
