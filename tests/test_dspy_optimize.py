"""Optimisation, saved programs and provider failures in a real ``dspy`` worker.

* ``optimize`` compiles in the worker, and the reply carries the program's new state for the host
  (``resource_states``): a fresh worker rebuilt from that state runs the optimised program.
* ``save_program`` / ``load_program`` round-trip a program through a file.
* Provider failures come from a real OpenAI-compatible HTTP server in this process answering
  429 / 401 / 500 or too slowly: DSPy's native client meets them as it would a real provider.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dspy")

import dspy
from dspy.utils.dummies import DummyLM

from dspy_helpers import answer_match, dspy_env, dummy, run_in_process
from mlbridge.testing import WorkerProcess
from worker_helpers import Spawner

pytestmark = pytest.mark.dspy

TRAIN = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
# Dict mode: DummyLM answers by the question it finds in the prompt, whatever worker runs it.
BY_QUESTION = {"q0": {"answer": "a0"}, "q1": {"answer": "a1"}, "q2": {"answer": "wrong"}}


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


def v2_worker(spawn: Spawner, tmp_path: Path) -> WorkerProcess:
    w = spawn("dspy", env=dspy_env(tmp_path))
    w.hello("msgpack")
    return w


def create(w: WorkerProcess, rid: str, config: dict[str, Any], state: Any = None) -> Any:
    args: dict[str, Any] = {"resource_id": rid, "config": config}
    if state is not None:
        args["state"] = state
    return w.request("create_program", args)


def test_bootstrap_few_shot_matches_dspy_and_reports_the_state(
    spawn: Spawner, tmp_path: Path
) -> None:
    params = {"max_bootstrapped_demos": 2, "max_labeled_demos": 3}
    student = dspy.Predict("question -> answer")
    trainset = [dspy.Example(**ex).with_inputs("question") for ex in TRAIN]
    with dspy.context(lm=DummyLM(BY_QUESTION)):
        compiled = dspy.BootstrapFewShot(
            metric=lambda ex, pred, trace=None: ex.answer == pred.answer, **params
        ).compile(student, trainset=trainset)
    expected_demos = compiled.dump_state()["demos"]
    assert len(expected_demos) == 3  # two bootstrapped (q0, q1), one labeled (q2)

    w = v2_worker(spawn, tmp_path)
    config = {"signature": "question -> answer", "lm": dummy(BY_QUESTION)}
    create(w, "p", config)
    reply = w.request(
        "optimize",
        {
            "program": "p",
            "optimizer": "bootstrap_few_shot",
            "trainset": TRAIN,
            "metric": "exact_match",
            "params": params,
        },
        raw=True,
    )
    assert reply["success"] is True, reply
    assert reply["result"]["status"] == "optimized"
    assert reply["result"]["demos"] == 3
    state = reply["resource_states"]["p"]
    assert state["module"]["demos"] == expected_demos
    assert state["optimization"]["optimizer"] == "BootstrapFewShot"
    assert w.request("get_resource", {"resource_id": "p"})["demos"] == 3

    # A fresh worker rebuilt from (config, state), as the host does after a crash.
    fresh = v2_worker(spawn, tmp_path)
    create(fresh, "p", config, state)
    info = fresh.request("get_resource", {"resource_id": "p"})
    assert info["demos"] == 3
    assert info["optimization"]["trainset_size"] == 3
    got = fresh.request("execute_resource", {"resource_id": "p", "inputs": {"question": "q1"}})
    with dspy.context(lm=DummyLM(BY_QUESTION)):
        assert got["outputs"] == dict(compiled(question="q1").toDict())


def test_labeled_demos_reach_the_prompt_after_a_rebuild(spawn: Spawner, tmp_path: Path) -> None:
    # follow_examples: DummyLM answers with the demo whose input equals the question, so the
    # answer proves the demos are in the prompt the rebuilt program sends.
    lm_spec = dummy([], follow_examples=True)
    config = {"signature": "question -> answer", "lm": lm_spec}
    w = v2_worker(spawn, tmp_path)
    create(w, "p", config)
    reply = w.request(
        "optimize",
        {"program": "p", "optimizer": "labeled_few_shot", "trainset": TRAIN, "params": {"k": 3}},
        raw=True,
    )
    state = reply["resource_states"]["p"]
    reference = dspy.LabeledFewShot(k=3).compile(
        dspy.Predict("question -> answer"),
        trainset=[dspy.Example(**ex).with_inputs("question") for ex in TRAIN],
    )
    assert state["module"]["demos"] == reference.dump_state()["demos"]  # same seeded sample
    assert sorted(d["question"] for d in state["module"]["demos"]) == ["q0", "q1", "q2"]
    expected = run_in_process(reference, DummyLM([], follow_examples=True), question="q2")
    assert expected == {"answer": "a2"}

    fresh = v2_worker(spawn, tmp_path)
    create(fresh, "p", config, state)
    got = fresh.request("execute_resource", {"resource_id": "p", "inputs": {"question": "q2"}})
    assert got["outputs"] == expected


def test_optimize_errors_name_the_problem(spawn: Spawner, tmp_path: Path) -> None:
    w = v2_worker(spawn, tmp_path)
    create(w, "p", {"signature": "question -> answer", "lm": dummy(BY_QUESTION)})
    cases = [
        ({"program": "p", "optimizer": "mipro", "trainset": TRAIN}, "invalid_configuration"),
        ({"program": "p", "trainset": []}, "invalid_request"),
        ({"program": "p", "trainset": [{"answer": "x"}]}, "invalid_request"),
        ({"program": "p", "trainset": TRAIN, "metric": "nowhere:m"}, "invalid_configuration"),
        ({"program": "p", "trainset": TRAIN, "params": {"bogus": 1}}, "invalid_configuration"),
        ({"program": "missing", "trainset": TRAIN}, "resource_not_found"),
    ]
    for args, code in cases:
        reply = w.request("optimize", args, raw=True)
        assert reply["success"] is False, args
        assert reply["error_code"] == code, (args, reply["error"])
        assert "resource_states" not in reply


def test_user_metric_and_save_load_round_trip(spawn: Spawner, tmp_path: Path) -> None:
    params = {"max_bootstrapped_demos": 1, "max_labeled_demos": 2}
    with dspy.context(lm=DummyLM(BY_QUESTION)):
        reference = dspy.BootstrapFewShot(metric=answer_match, **params).compile(
            dspy.Predict("question -> answer"),
            trainset=[dspy.Example(**ex).with_inputs("question") for ex in TRAIN],
        )
    assert len(reference.demos) == 2
    w = v2_worker(spawn, tmp_path)
    config = {"signature": "question -> answer", "lm": dummy(BY_QUESTION)}
    create(w, "p", config)
    out = w.request(
        "optimize",
        {
            "program": "p",
            "trainset": TRAIN,
            "metric": "dspy_helpers:answer_match",
            "params": params,
        },
    )
    assert out["demos"] == 2
    path = tmp_path / "saved" / "program.json"
    saved = w.request("save_program", {"program": "p", "path": str(path)})
    assert saved["status"] == "saved" and saved["path"] == str(path)
    data = json.loads(path.read_text())
    assert data["format"] == "mlbridge.dspy.program"
    assert len(data["state"]["module"]["demos"]) == 2

    other = v2_worker(spawn, tmp_path)
    loaded = other.request("load_program", {"path": str(path), "id": "restored"})
    assert loaded["status"] == "loaded" and loaded["demos"] == 2
    before = w.request("execute_resource", {"resource_id": "p", "inputs": {"question": "q0"}})
    after = other.request(
        "execute_resource", {"resource_id": "restored", "inputs": {"question": "q0"}}
    )
    assert after["outputs"] == before["outputs"] == {"answer": "a0"}
    # The same file as a host-owned resource config: any worker rebuilds it from the path.
    create(other, "from_file", {"load_from": str(path)})
    assert other.request("get_resource", {"resource_id": "from_file"})["demos"] == 2
    bad = tmp_path / "not-a-program.json"
    bad.write_text("{}")
    reply = other.request("load_program", {"path": str(bad)}, raw=True)
    assert reply["success"] is False and reply["error_code"] == "invalid_configuration"


# --------------------------------------------------------------------------- provider failures
class _Provider(BaseHTTPRequestHandler):
    mode: Any = 200

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        mode = type(self).mode
        if mode == "slow":
            time.sleep(3)
            mode = 200
        if mode == 200:
            content = "[[ ## answer ## ]]\nfrom the server\n\n[[ ## completed ## ]]"
            body: dict[str, Any] = {
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": "test-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
            }
        else:
            body = {"error": {"message": f"provider said {mode}", "type": "test", "code": mode}}
        payload = json.dumps(body).encode()
        try:
            self.send_response(mode)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout case)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def provider() -> Iterator[tuple[str, type[_Provider]]]:
    handler = type("Provider", (_Provider,), {"mode": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    server.shutdown()
    server.server_close()


def test_provider_failures_map_to_common_kinds_keeping_type_and_text(
    spawn: Spawner, tmp_path: Path, provider: tuple[str, type[_Provider]]
) -> None:
    base, handler = provider
    w = v2_worker(spawn, tmp_path)
    lm = {
        "model": "openai/test-model",
        "api_base": base,
        "api_key": "sk-local-test",
        "num_retries": 0,
        "timeout": 1,
        "cache": False,
    }
    w.request("configure_lm", lm)
    create(w, "p", {"signature": "question -> answer"})
    ok = w.request("execute_resource", {"resource_id": "p", "inputs": {"question": "q"}})
    assert ok["outputs"] == {"answer": "from the server"}
    assert ok["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    for mode, code, dspy_type in [
        (429, "rate_limit", "LMRateLimitError"),
        (401, "invalid_configuration", "LMAuthError"),
        (500, "model_error", "LMServerError"),
        ("slow", "timeout", "LMTransportError"),
    ]:
        handler.mode = mode
        reply = w.request(
            "execute_resource", {"resource_id": "p", "inputs": {"question": "q"}}, raw=True
        )
        assert reply["success"] is False, mode
        assert reply["error_code"] == code, (mode, reply["error"])
        assert reply["error_type"] == dspy_type
        assert "test-model" in reply["error"]
        assert "sk-local-test" not in json.dumps(reply)
