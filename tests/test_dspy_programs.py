"""DSPy programs in a real ``dspy`` worker, each compared with the same program run in-process.

The scripted model is DSPy's own ``DummyLM`` (given to the worker as an LM spec); the in-process
reference is plain DSPy code, so each parity test checks what the bridge adds (program building,
LM plumbing, output extraction, the wire) against DSPy itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dspy")

import dspy
from dspy.utils.dummies import DummyLM

from dspy_helpers import (
    JSONDummyLM,
    QAWithContext,
    StreamingDummyLM,
    add,
    dspy_env,
    dummy,
    run_in_process,
)
from mlbridge import errors
from mlbridge.testing import WorkerProcess
from worker_helpers import Spawner, wait_busy

pytestmark = pytest.mark.dspy


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    w = WorkerProcess("dspy", env=dspy_env(tmp_path_factory.mktemp("dspy")))
    try:
        w.hello("msgpack")
        yield w
    finally:
        w.close()


def create(w: WorkerProcess, config: dict[str, Any], rid: str) -> dict[str, Any]:
    return dict(w.request("create_program", {"resource_id": rid, "config": config}))


def execute(w: WorkerProcess, rid: str, inputs: dict[str, Any]) -> dict[str, Any]:
    return dict(w.request("execute_resource", {"resource_id": rid, "inputs": inputs}))


def test_predict_matches_dspy_in_process(worker: WorkerProcess) -> None:
    answers = [{"answer": "Paris"}]
    expected = run_in_process(
        dspy.Predict("question -> answer"), DummyLM(answers), question="Capital of France?"
    )
    create(worker, {"signature": "question -> answer", "lm": dummy(answers)}, "predict")
    result = execute(worker, "predict", {"question": "Capital of France?"})
    assert result["outputs"] == expected == {"answer": "Paris"}
    assert set(result["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert 0 < result["execution_time"] < 5


def test_chain_of_thought_returns_reasoning_like_dspy(worker: WorkerProcess) -> None:
    answers = [{"reasoning": "France's capital city is Paris.", "answer": "Paris"}]
    expected = run_in_process(
        dspy.ChainOfThought("question -> answer"), DummyLM(answers), question="Capital?"
    )
    config = {"signature": "question -> answer", "program_type": "chain_of_thought"}
    create(worker, {**config, "lm": dummy(answers)}, "cot")
    result = execute(worker, "cot", {"question": "Capital?"})
    assert result["outputs"] == expected
    assert result["outputs"]["reasoning"] == "France's capital city is Paris."


def test_react_runs_the_tool_in_the_worker_and_returns_the_trajectory(
    worker: WorkerProcess,
) -> None:
    answers = [
        {"next_thought": "add them", "next_tool_name": "add", "next_tool_args": {"a": 2, "b": 3}},
        {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
        {"reasoning": "the tool said 5", "answer": "5"},
    ]
    expected = run_in_process(
        dspy.ReAct("question -> answer", tools=[add]), DummyLM(answers), question="2 + 3?"
    )
    config = {
        "signature": "question -> answer",
        "program_type": "react",
        "tools": ["dspy_helpers:add"],
        "lm": dummy(answers),
    }
    create(worker, config, "react")
    result = execute(worker, "react", {"question": "2 + 3?"})
    assert result["outputs"] == expected
    trajectory = result["outputs"]["trajectory"]
    assert trajectory["tool_name_0"] == "add"
    assert trajectory["observation_0"] == 5  # computed by the real tool, in the worker
    assert result["outputs"]["answer"] == "5"


def test_custom_module_with_kwargs_matches_in_process(worker: WorkerProcess) -> None:
    answers = [
        {"context": "Paris is in France."},
        {"reasoning": "from the context", "answer": "Paris"},
    ]
    expected = run_in_process(
        QAWithContext(style="long"), DummyLM(answers), question="Where is Paris?"
    )
    config = {
        "module": "dspy_helpers:QAWithContext",
        "module_kwargs": {"style": "long"},
        "lm": dummy(answers),
    }
    info = create(worker, config, "custom")
    assert info["program_type"] == "module"
    result = execute(worker, "custom", {"question": "Where is Paris?"})
    assert result["outputs"] == expected
    assert result["outputs"]["context"] == "Paris is in France."


def test_typed_outputs_keep_their_types(worker: WorkerProcess) -> None:
    sig = (
        "question: str -> count: int, ratio: float, ok: bool, tags: list[str], "
        "label: Literal['yes', 'no'], scores: dict[str, int]"
    )
    answers = [
        {
            "count": 3,
            "ratio": 0.5,
            "ok": True,
            "tags": ["a", "b"],
            "label": "yes",
            "scores": {"x": 1},
        }
    ]
    expected = run_in_process(dspy.Predict(sig), DummyLM(answers), question="q")
    create(worker, {"signature": sig, "lm": dummy(answers)}, "typed")
    outputs = execute(worker, "typed", {"question": "q"})["outputs"]
    assert outputs == expected
    assert outputs == {
        "count": 3,
        "ratio": 0.5,
        "ok": True,
        "tags": ["a", "b"],
        "label": "yes",
        "scores": {"x": 1},
    }
    assert type(outputs["count"]) is int and type(outputs["ok"]) is bool


def test_json_adapter_program_matches_in_process(worker: WorkerProcess) -> None:
    answers = [{"answer": "blue"}]
    expected = run_in_process(
        dspy.Predict("question -> answer"),
        JSONDummyLM(answers),
        adapter=dspy.JSONAdapter(),
        question="Sky colour?",
    )
    config = {
        "signature": "question -> answer",
        "adapter": "json",
        "lm": {"class": "dspy_helpers:JSONDummyLM", "kwargs": {"answers": answers}},
    }
    info = create(worker, config, "json")
    assert info["adapter"] == "json"
    assert execute(worker, "json", {"question": "Sky colour?"})["outputs"] == expected


def test_dspex_dict_signature_with_types_descriptions_and_instructions(
    worker: WorkerProcess,
) -> None:
    signature = {
        "name": "Classify",
        "description": "Classify the sentiment of a review.",
        "inputs": [{"name": "review", "description": "a product review"}],
        "outputs": [
            {"name": "sentiment", "type": "Literal['positive', 'negative']"},
            {"name": "stars", "type": "integer", "description": "1 to 5"},
        ],
    }
    info = create(
        worker,
        {"signature": signature, "lm": dummy([{"sentiment": "positive", "stars": 5}])},
        "cls",
    )
    assert info["signature"] == signature  # as given (the DSPex reply shape)
    described = info["signature_def"]
    assert described["name"] == "Classify"
    assert described["instructions"] == "Classify the sentiment of a review."
    assert described["inputs"] == [
        {"name": "review", "description": "a product review", "type": "str"}
    ]
    assert described["outputs"][1] == {"name": "stars", "description": "1 to 5", "type": "int"}
    outputs = execute(worker, "cls", {"review": "great"})["outputs"]
    assert outputs == {"sentiment": "positive", "stars": 5}


@pytest.mark.parametrize(
    ("signature", "fragment"),
    [
        ("question answer", "exactly one '->'"),
        ("question -> ", "no output fields"),
        ("q: foo -> a", "foo"),
        ("q -> q", "distinct"),
        ({"inputs": [{"name": "q"}], "outputs": []}, "at least one output"),
        ({"inputs": [{"name": "bad name"}], "outputs": ["a"]}, "identifier"),
        ({"inputs": ["q"], "outputs": [{"name": "a", "type": "complex"}]}, "complex"),
        (42, "must be a string"),
    ],
)
def test_invalid_signature_is_invalid_configuration_never_a_fallback(
    worker: WorkerProcess, signature: Any, fragment: str
) -> None:
    reply = worker.request(
        "create_program", {"resource_id": "bad", "config": {"signature": signature}}, raw=True
    )
    assert reply["success"] is False
    assert reply["error_code"] == "invalid_configuration"
    assert fragment in reply["error"]
    listed = worker.request("list_programs")
    assert all(p["id"] != "bad" for p in listed["programs"])


def test_bad_program_config_names_the_problem(worker: WorkerProcess) -> None:
    cases = [
        ({"signature": "q -> a", "program_type": "tree_of_thought"}, "program_type"),
        ({"signature": "q -> a", "program_type": "react"}, "tools"),
        ({"signature": "q -> a", "tools": ["dspy_helpers:add"]}, "react"),
        ({"signature": "q -> a", "program_type": "react", "tools": ["nowhere:fn"]}, "nowhere"),
        ({"module": "dspy_helpers:add"}, "not a dspy.Module"),
        ({"signature": "q -> a", "adapter": "yaml"}, "adapter"),
        ({"signature": "q -> a", "lm": {"class": "dspy_helpers:add"}}, "BaseLM"),
        ({"signature": "q -> a", "colour": "red"}, "colour"),
    ]
    for config, fragment in cases:
        reply = worker.request("create_program", {"resource_id": "bad", "config": config}, raw=True)
        assert reply["success"] is False, config
        assert reply["error_code"] == "invalid_configuration", reply
        assert fragment in reply["error"], (fragment, reply["error"])


def test_inputs_must_match_the_signature(worker: WorkerProcess) -> None:
    create(worker, {"signature": "question, context -> answer", "lm": dummy([])}, "strict")
    with pytest.raises(errors.InvalidRequestError, match=r"missing \['context'\]"):
        execute(worker, "strict", {"question": "q"})
    with pytest.raises(errors.InvalidRequestError, match=r"unexpected \['extra'\]"):
        execute(worker, "strict", {"question": "q", "context": "c", "extra": 1})


def test_unparseable_model_answer_is_a_model_error_with_dspy_type(worker: WorkerProcess) -> None:
    # The scripted answer lacks the 'answer' field: DSPy's adapter cannot parse it.
    create(worker, {"signature": "question -> answer", "lm": dummy([{"other": "x"}] * 2)}, "nop")
    reply = worker.request(
        "execute_resource", {"resource_id": "nop", "inputs": {"question": "q"}}, raw=True
    )
    assert reply["success"] is False
    assert reply["error_code"] == "model_error"
    assert reply["error_type"] == "AdapterParseError"


def test_batch_in_one_worker_returns_results_in_order(worker: WorkerProcess) -> None:
    answers = [{"answer": f"a{i}"} for i in range(4)]
    reference = dspy.Predict("question -> answer")
    lm = DummyLM(answers)
    expected = [run_in_process(reference, lm, question=f"q{i}") for i in range(4)]
    create(worker, {"signature": "question -> answer", "lm": dummy(answers)}, "batch")
    batch = [{"question": f"q{i}"} for i in range(4)]
    result = execute(worker, "batch", {"batch": batch})
    assert [r["outputs"] for r in result["results"]] == expected
    assert result["count"] == 4
    assert result["workers"] == [result["results"][0]["worker_id"]]


def test_stream_yields_field_deltas_then_the_same_result(worker: WorkerProcess) -> None:
    answers = [{"reasoning": "Paris is the capital of France.", "answer": "Paris, France"}]
    expected = run_in_process(
        dspy.ChainOfThought("question -> answer"), DummyLM(answers), question="Capital?"
    )
    config = {
        "signature": "question -> answer",
        "program_type": "chain_of_thought",
        "lm": {"class": "dspy_helpers:StreamingDummyLM", "kwargs": {"answers": answers}},
    }
    create(worker, config, "streamed")
    worker.send(
        {
            "id": 77,
            "command": "execute_resource",
            "args": {"resource_id": "streamed", "inputs": {"question": "Capital?"}},
            "stream": True,
        }
    )
    chunks = []
    while True:
        frame = worker.recv(20)
        assert frame["id"] == 77
        if "chunk" in frame:
            chunks.append(frame["chunk"])
            continue
        break
    assert frame["success"] is True, frame
    assert frame["result"]["outputs"] == expected
    fields = [c["field"] for c in chunks]
    assert fields.index("reasoning") < fields.index("answer")
    assert len(chunks) >= 4  # delivered a few characters at a time
    for name, value in expected.items():
        text = "".join(c["delta"] for c in chunks if c["field"] == name)
        assert text.strip() == value
    assert frame["result"]["usage"]["total_tokens"] == 12


def test_streaming_lm_gives_same_outputs_in_process() -> None:
    # The test double itself: streamed or not, DSPy parses the same answer.
    answers = [{"answer": "ok"}]
    out = run_in_process(dspy.Predict("q -> answer"), StreamingDummyLM(answers), q="x")
    assert out == {"answer": "ok"}


def test_cancel_stops_the_program_before_its_next_lm_call(spawn: Spawner, tmp_path: Path) -> None:
    marker = tmp_path / "tool-runs.txt"
    env = {**dspy_env(tmp_path), "MLBRIDGE_TEST_MARKER": str(marker)}
    w = spawn("dspy", env=env)
    w.hello("json")
    step = {"next_thought": "add", "next_tool_name": "slow_add", "next_tool_args": {"a": 1, "b": 1}}
    config = {
        "signature": "question -> answer",
        "program_type": "react",
        "tools": ["dspy_helpers:slow_add"],
        "max_iters": 5,
        "lm": dummy([step] * 5 + [{"reasoning": "r", "answer": "2"}]),
    }
    create(w, config, "slow")
    w.send(
        {
            "id": 5,
            "command": "execute_resource",
            "args": {"resource_id": "slow", "inputs": {"question": "q"}},
        }
    )
    wait_busy(w, "execute_resource")
    deadline = time.monotonic() + 10
    while not marker.exists():  # the tool is running its first (one-second) step
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t0 = time.monotonic()
    w.send({"id": 6, "command": "cancel", "args": {"target": 5}})
    replies = {}
    while len(replies) < 2:
        frame = w.recv(10)
        replies[frame["id"]] = frame
    assert replies[6]["result"]["cancelled"] is True
    assert replies[5]["success"] is False
    assert replies[5]["error_code"] == "cancelled"
    assert "next LM call" in replies[5]["error"]
    assert time.monotonic() - t0 < 2.0
    assert marker.read_text().count("ran") == 1  # no second step: no LM call after the cancel
    assert w.request("ping")["status"] == "ok"


def test_bridge_wide_lm_and_per_program_lm(spawn: Spawner, tmp_path: Path) -> None:
    w = spawn("dspy", env=dspy_env(tmp_path))
    w.hello("msgpack")
    reply = w.request("configure_lm", dummy([{"answer": "bridge-wide"}] * 3))
    assert reply["status"] == "configured"
    create(w, {"signature": "question -> answer"}, "uses_bridge")
    create(w, {"signature": "question -> answer", "lm": dummy([{"answer": "own"}])}, "own_lm")
    assert execute(w, "uses_bridge", {"question": "q"})["outputs"] == {"answer": "bridge-wide"}
    assert execute(w, "own_lm", {"question": "q"})["outputs"] == {"answer": "own"}
    assert execute(w, "uses_bridge", {"question": "q"})["outputs"] == {"answer": "bridge-wide"}
    assert w.request("get_lm")["lm"]["class"] == "dspy.utils.dummies:DummyLM"


def test_configure_lm_reports_bridge_state_and_never_returns_the_key(
    spawn: Spawner, tmp_path: Path
) -> None:
    w = spawn("dspy", env=dspy_env(tmp_path))
    w.hello("msgpack")
    secret = "sk-test-do-not-leak-1234567890"
    t0 = time.monotonic()
    reply = w.request(
        "configure_lm",
        {"model": "openai/gpt-4o-mini", "api_key": secret, "temperature": 0.2, "max_tokens": 64},
        raw=True,
    )
    assert time.monotonic() - t0 < 2.0  # no live test call (there is no network here)
    assert reply["success"] is True
    result = reply["result"]
    assert result == {
        "status": "configured",
        "model": "openai/gpt-4o-mini",
        "provider": "openai",
        "temperature": 0.2,
        "lm": {
            "model": "openai/gpt-4o-mini",
            "api_key_set": True,
            "temperature": 0.2,
            "max_tokens": 64,
            "provider": "openai",
        },
    }
    # The spec goes to the host (which replays it to the other workers) beside the result.
    assert reply["bridge_state"]["lm"]["api_key"] == secret
    for command in ("get_stats", "get_info", "get_lm", "list_programs"):
        assert secret not in repr(w.request(command)), command
    create(w, {"signature": "q -> a", "lm": {"model": "openai/x", "api_key": secret}}, "p")
    assert secret not in repr(w.request("get_resource", {"resource_id": "p"}))
    assert secret not in repr(w.request("list_programs"))


def test_configure_lm_failures_are_failure_replies(worker: WorkerProcess) -> None:
    for args, fragment in [
        ({}, "model is required"),
        ({"model": "openai/"}, "no model id"),
        ({"model": "openai/x", "temperature": "hot"}, "temperature"),
        ({"class": "nowhere.mod:LM"}, "nowhere.mod"),
        ({"model": "openai/x", "colour": 1}, "colour"),
    ]:
        reply = worker.request("configure_lm", args, raw=True)
        assert reply["success"] is False, args
        assert reply["error_code"] == "invalid_configuration"
        assert fragment in reply["error"], (fragment, reply["error"])
