"""The Transformers bridge through a real worker, with a tiny GPT-2 built in a fixture.

One worker serves the module (a Transformers worker takes ~5 s to import torch/transformers).
Greedy decoding is deterministic, so the worker's answers are compared with the same model run
in this process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hf_fixtures import (
    stream_request,
    transformers_worker,
)
from mlbridge.errors import InvalidRequestError, ModelError, ResourceNotFoundError
from mlbridge.testing import WorkerProcess

pytestmark = pytest.mark.transformers

MESSAGES = [{"role": "user", "content": "hello! how are you?"}]


@pytest.fixture(scope="module")
def worker(hf_cache_dir: Path) -> Iterator[WorkerProcess]:
    with transformers_worker(hf_cache_dir) as w:
        yield w


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir: Path) -> str:
    return str(tiny_gpt2_dir)


@pytest.fixture(scope="module")
def local_lm(tiny: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny)
    model.eval()
    return model, AutoTokenizer.from_pretrained(tiny)


def test_get_info_reports_device_and_builtins(worker: WorkerProcess) -> None:
    info = worker.request("get_info")
    fw = info["framework"]
    assert fw["name"] == "transformers"
    assert fw["device"] == "cpu"
    assert fw["dtype"] == "float32"
    assert fw["allow_downloads"] is False
    assert {"local:smollm2", "local:minilm"} <= set(fw["builtin_models"])
    for cmd in ("chat", "generate", "embed", "tokenize", "detokenize", "create_pipeline"):
        assert cmd in info["commands"]
    assert {"model", "pipeline", "tokenizer", "embedder"} <= set(info["resource_types"])


def test_pipeline_resource_matches_in_process(worker: WorkerProcess, tiny: str) -> None:
    from transformers import pipeline

    created = worker.request(
        "create_pipeline", {"resource_id": "gen", "task": "text-generation", "model": tiny}
    )
    assert created["status"] == "created"
    assert created["architecture"] == "GPT2LMHeadModel"
    inputs = {"inputs": "the quick brown", "max_new_tokens": 12, "do_sample": False}
    remote = worker.request("execute_resource", {"resource_id": "gen", "inputs": inputs})
    local = pipeline("text-generation", model=tiny)(
        "the quick brown", max_new_tokens=12, do_sample=False
    )
    assert remote["outputs"] == local
    assert len(local[0]["generated_text"]) > len("the quick brown")
    listed = worker.request("list_pipelines")
    assert [r["id"] for r in listed["resources"]] == ["gen"]


def test_feature_extraction_pipeline_matches_in_process(worker: WorkerProcess, tiny: str) -> None:
    import numpy as np
    from transformers import pipeline

    worker.request(
        "create_pipeline", {"resource_id": "feat", "task": "feature-extraction", "model": tiny}
    )
    remote = worker.request(
        "execute_resource", {"resource_id": "feat", "inputs": {"inputs": "hello world"}}
    )
    local = pipeline("feature-extraction", model=tiny)("hello world")
    np.testing.assert_allclose(np.array(remote["outputs"]), np.array(local), atol=1e-5)
    worker.request("delete_resource", {"resource_id": "feat"})


def test_tokenize_detokenize_round_trip(
    worker: WorkerProcess, tiny: str, local_lm: tuple[Any, Any]
) -> None:
    text = "hello world, the quick brown fox"
    tok = worker.request("tokenize", {"model": tiny, "text": text})
    assert tok["ids"] == local_lm[1](text)["input_ids"]
    assert tok["count"] == len(tok["ids"]) == len(tok["tokens"])
    back = worker.request("detokenize", {"model": tiny, "ids": tok["ids"]})
    assert back == {"text": text}
    batch = worker.request("tokenize", {"model": tiny, "texts": ["hello", "the lazy dog"]})
    assert batch["counts"] == [len(i) for i in batch["ids"]]
    texts = worker.request("detokenize", {"model": tiny, "ids": batch["ids"]})
    assert texts == {"texts": ["hello", "the lazy dog"]}


def test_generate_matches_in_process_greedy(
    worker: WorkerProcess, tiny: str, local_lm: tuple[Any, Any]
) -> None:
    import torch

    model, tok = local_lm
    result = worker.request("generate", {"model": tiny, "prompt": "hello world", "max_tokens": 10})
    enc = tok("hello world", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert result["text"] == expected
    assert result["message"] == {"role": "assistant", "content": expected}
    usage = result["usage"]
    assert usage["prompt_tokens"] == enc["input_ids"].shape[1]
    assert usage["completion_tokens"] == out.shape[1] - enc["input_ids"].shape[1]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result["finish_reason"] in ("length", "stop")


def test_max_completion_tokens_wins_over_max_tokens(worker: WorkerProcess, tiny: str) -> None:
    args = {"model": tiny, "messages": MESSAGES, "max_tokens": 20, "max_completion_tokens": 3}
    result = worker.request("chat", args)
    assert result["usage"]["completion_tokens"] <= 3
    only_max = worker.request("chat", {"model": tiny, "messages": MESSAGES, "max_tokens": 5})
    assert only_max["usage"]["completion_tokens"] <= 5


def test_chat_stream_deltas_add_up_to_the_reply(worker: WorkerProcess, tiny: str) -> None:
    args = {"model": tiny, "messages": MESSAGES, "max_tokens": 16}
    plain = worker.request("chat", args)
    chunks, reply = stream_request(worker, "chat", args)
    assert reply["success"], reply
    deltas = [c["delta"] for c in chunks if "delta" in c]
    assert len(deltas) >= 2
    final = reply["result"]
    assert "".join(deltas) == final["message"]["content"] == plain["message"]["content"]
    assert final["usage"] == plain["usage"]


def test_stop_strings_cut_the_answer(worker: WorkerProcess, tiny: str) -> None:
    args: dict[str, Any] = {"model": tiny, "messages": MESSAGES, "max_tokens": 24}
    text = worker.request("chat", args)["message"]["content"]
    assert len(text) >= 6, text
    stop = text[4:6]
    cut = text[: text.find(stop)]
    stopped = worker.request("chat", {**args, "stop": [stop]})
    assert stopped["message"]["content"] == cut
    assert stopped["finish_reason"] == "stop"
    chunks, reply = stream_request(worker, "chat", {**args, "stop": stop})
    assert "".join(c["delta"] for c in chunks if "delta" in c) == cut
    assert reply["result"]["message"]["content"] == cut


def test_seeded_sampling_is_reproducible(worker: WorkerProcess, tiny: str) -> None:
    args = {"model": tiny, "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    a = worker.request("chat", args)["message"]["content"]
    b = worker.request("chat", args)["message"]["content"]
    assert a == b


def test_model_resource_shares_the_cached_model(worker: WorkerProcess, tiny: str) -> None:
    created = worker.request(
        "create_model", {"resource_id": "lm", "model": tiny, "task": "causal-lm"}
    )
    assert created["architecture"] == "GPT2LMHeadModel"
    assert created["parameters"] > 0
    via_resource = worker.request("chat", {"model": "lm", "messages": MESSAGES, "max_tokens": 6})
    via_path = worker.request("chat", {"model": tiny, "messages": MESSAGES, "max_tokens": 6})
    assert via_resource["message"] == via_path["message"]
    executed = worker.request(
        "execute_resource", {"resource_id": "lm", "inputs": {"prompt": "hello", "max_tokens": 4}}
    )
    assert executed["usage"]["completion_tokens"] <= 4
    loaded = worker.request("list_models")["loaded"]
    causal = [m for m in loaded if m["path"] == tiny and m["component"] == "AutoModelForCausalLM"]
    assert len(causal) == 1, loaded  # pipeline, model resource and chat share one copy


def test_tokenizer_resource(worker: WorkerProcess, tiny: str) -> None:
    worker.request("create_tokenizer", {"resource_id": "tok", "model": tiny})
    ids = worker.request("execute_resource", {"resource_id": "tok", "inputs": {"text": "hello"}})
    text = worker.request("execute_resource", {"resource_id": "tok", "inputs": {"ids": ids["ids"]}})
    assert text == {"text": "hello"}
    assert worker.request("tokenize", {"model": "tok", "text": "hello"})["ids"] == ids["ids"]


def test_load_model_streams_progress_then_unloads(worker: WorkerProcess, tiny: str) -> None:
    worker.request("unload_model", {"model": tiny})
    chunks, reply = stream_request(worker, "load_model", {"model": tiny})
    assert reply["success"], reply
    stages = [c["progress"]["stage"] for c in chunks]
    assert stages[0] == "load_start" and stages[-1] == "ready", stages
    assert reply["result"]["kind"] == "causal-lm"
    assert reply["result"]["device"] == "cpu"
    again = worker.request("load_model", {"model": tiny})
    assert again["seconds"] < 0.5  # cached
    gone = worker.request("unload_model", {"model": tiny})
    assert gone["unloaded"] >= 1
    assert not [m for m in worker.request("list_models")["loaded"] if m["path"] == tiny]


def test_list_models_shows_the_builtins(worker: WorkerProcess) -> None:
    listed = worker.request("list_models")
    builtins = {m["id"]: m for m in listed["builtin"]}
    assert builtins["local:minilm"]["kind"] == "embedding"
    assert builtins["local:minilm"]["available"] is True
    assert builtins["local:smollm2"]["kind"] == "chat"


# ---------------------------------------------------------------------- errors
def test_missing_path_is_a_model_error(worker: WorkerProcess, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match="does not exist") as info:
        worker.request("create_pipeline", {"task": "text-generation", "model": missing})
    assert missing in str(info.value)
    with pytest.raises(ModelError, match="does not exist"):
        worker.request("chat", {"model": missing, "messages": MESSAGES})


def test_directory_without_a_model_is_a_model_error(worker: WorkerProcess, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="save_pretrained"):
        worker.request("create_model", {"model": str(tmp_path)})


def test_unknown_task_is_an_invalid_request(worker: WorkerProcess, tiny: str) -> None:
    with pytest.raises(InvalidRequestError, match="unknown task 'text-dreaming'") as info:
        worker.request("create_pipeline", {"task": "text-dreaming", "model": tiny})
    assert "text-generation" in str(info.value)  # names the known tasks
    with pytest.raises(InvalidRequestError, match="unknown task"):
        worker.request("create_model", {"task": "text-dreaming", "model": tiny})


def test_task_the_model_cannot_run_is_a_model_error(worker: WorkerProcess, tiny: str) -> None:
    with pytest.raises(ModelError, match="cannot run the 'fill-mask' task"):
        worker.request("create_pipeline", {"task": "fill-mask", "model": tiny})


def test_hub_id_offline_fails_fast_and_clearly(worker: WorkerProcess) -> None:
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="downloads are off") as info:
        worker.request("chat", {"model": "HuggingFaceTB/SmolLM2-1.7B", "messages": MESSAGES})
    assert time.monotonic() - t0 < 3.0
    assert "allow_downloads" in str(info.value)
    assert "local:smollm2" in str(info.value)


def test_hub_id_fails_fast_even_if_the_environment_allows_the_hub(
    hf_cache_dir: Path,
) -> None:
    # The bridge, not the caller's environment, decides: downloads are off unless a setting says.
    env = {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    with transformers_worker(hf_cache_dir, env=env) as w:
        t0 = time.monotonic()
        with pytest.raises(ModelError, match="downloads are off"):
            w.request("create_pipeline", {"task": "text-generation", "model": "openai/gpt-oss"})
        assert time.monotonic() - t0 < 3.0


def test_bad_generation_arguments(worker: WorkerProcess, tiny: str) -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        worker.request("chat", {"model": tiny, "messages": MESSAGES, "max_tokens": 0})
    with pytest.raises(InvalidRequestError, match="messages"):
        worker.request("chat", {"model": tiny, "messages": []})
    with pytest.raises(InvalidRequestError, match="stop"):
        worker.request("chat", {"model": tiny, "messages": MESSAGES, "stop": 3})
    with pytest.raises(InvalidRequestError, match="context"):
        worker.request("generate", {"model": tiny, "prompt": "hello " * 200})
    with pytest.raises(ResourceNotFoundError):
        worker.request("execute_resource", {"resource_id": "nope", "inputs": {}})


def test_worker_still_serves_after_errors(worker: WorkerProcess, tiny: str) -> None:
    assert worker.request("tokenize", {"model": tiny, "text": "ok"})["count"] >= 1
    stats = worker.request("get_stats")
    assert stats["error_count"] >= 1


def test_bad_settings_fail_the_boot(hf_cache_dir: Path) -> None:
    w = WorkerProcess("transformers", settings={"dtype": "float8", "model_cache_dir": "/tmp"})
    try:
        assert w.wait(60) != 0
        assert "dtype" in w.stderr_text()
    finally:
        w.close()
