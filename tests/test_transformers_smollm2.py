"""The built-in local chat model (``local:smollm2``) through real Transformers workers, on the
Transformers runtime (``runtime="transformers"``; llama.cpp's is in test_transformers_llama.py).

The GGUF file is converted once per test session into a temporary model cache (``smollm2_load``,
~20-30 s); the workers here then load the fp32 copy in well under a second.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hf_fixtures import (
    smollm2_path,
    stream_request,
    transformers_worker,
)
from mlbridge.testing import WorkerProcess
from worker_helpers import drain_until_reply

pytestmark = [pytest.mark.transformers, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


@pytest.fixture(scope="module")
def smol(hf_cache_dir: Path, smollm2_load: dict[str, Any]) -> Iterator[WorkerProcess]:
    with transformers_worker(hf_cache_dir, runtime="transformers") as w:
        w.request("load_model", {"model": "local:smollm2"})
        yield w


def test_conversion_streams_progress(smollm2_load: dict[str, Any]) -> None:
    progress = [c["progress"] for c in smollm2_load["chunks"]]
    stages = [p["stage"] for p in progress]
    for stage in ("convert_start", "convert_tensors", "convert_done", "load_start", "ready"):
        assert stage in stages, stages
    tensors = [p for p in progress if p["stage"] == "convert_tensors"]
    assert tensors[-1]["done"] == tensors[-1]["total"] > 100
    result = smollm2_load["result"]
    assert result["architecture"] == "LlamaForCausalLM"
    assert 130e6 < result["parameters"] < 140e6
    assert result["kind"] == "causal-lm"


def test_converted_copy_is_a_plain_fp32_checkpoint(
    hf_cache_dir: Path,
    smollm2_load: dict[str, Any],
) -> None:
    path = Path(smollm2_path(hf_cache_dir))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (path / "model.safetensors").stat().st_size > 400e6
    assert (path / "chat_template.jinja").is_file() or "chat_template" in (
        path / "tokenizer_config.json"
    ).read_text()


def test_a_new_worker_loads_the_converted_copy_fast(hf_cache_dir: Path) -> None:
    with transformers_worker(hf_cache_dir, runtime="transformers") as w:
        listed = {m["id"]: m for m in w.request("list_models")["builtin"]}
        assert listed["local:smollm2"]["prepared"] is True
        result = w.request("load_model", {"model": "local:smollm2"})
    assert result["load_time_s"] < 1.5, result  # ~0.3 s on 2 idle cores


def test_chat_answers(smol: WorkerProcess) -> None:
    result = smol.request(
        "chat", {"model": "local:smollm2", "messages": QUESTION, "max_tokens": 24}
    )
    content = result["message"]["content"]
    assert result["message"]["role"] == "assistant"
    assert content.strip()
    assert "Paris" in content
    assert result["finish_reason"] == "stop"
    assert 0 < result["usage"]["completion_tokens"] <= 24
    assert result["usage"]["prompt_tokens"] > 10


def test_chat_defaults_to_the_local_model(smol: WorkerProcess) -> None:
    result = smol.request("chat", {"messages": QUESTION, "max_completion_tokens": 4})
    assert result["model"] == "local:smollm2"
    assert result["usage"]["completion_tokens"] <= 4
    assert result["finish_reason"] == "length"


def test_streaming_yields_several_chunks_before_the_reply(smol: WorkerProcess) -> None:
    chunks, reply = stream_request(smol, "chat", {"messages": QUESTION, "max_tokens": 24})
    assert reply["success"], reply
    deltas = [c["delta"] for c in chunks if "delta" in c]
    assert len(deltas) >= 3
    final = reply["result"]["message"]["content"]
    assert "".join(deltas) == final
    assert "Paris" in final


def test_cancel_stops_a_streaming_generation(smol: WorkerProcess) -> None:
    smol.send(
        {
            "id": 501,
            "command": "chat",
            "args": {"messages": STORY, "max_tokens": 400},
            "stream": True,
        }
    )
    seen = 0
    while seen < 3:
        frame = smol.recv(60)
        assert frame["id"] == 501 and "chunk" in frame, frame
        seen += "delta" in frame["chunk"]
    t0 = time.monotonic()
    smol.send({"id": 502, "command": "cancel", "args": {"target": 501}})
    chunks, reply = drain_until_reply(smol, 501, 30)
    assert time.monotonic() - t0 < 5.0
    assert reply["success"] is False
    assert reply["error_code"] == "cancelled"
    assert seen + len(chunks) < 100  # far short of max_tokens=400
    after = smol.request("chat", {"messages": QUESTION, "max_tokens": 8})  # still serves
    assert after["message"]["content"]


def test_cancel_stops_a_plain_generation(smol: WorkerProcess) -> None:
    t0 = time.monotonic()
    smol.send({"id": 601, "command": "chat", "args": {"messages": STORY, "max_tokens": 400}})
    time.sleep(1.5)
    smol.send({"id": 602, "command": "cancel", "args": {"target": 601}})
    t_cancel = time.monotonic()
    _, reply = drain_until_reply(smol, 601, 60)
    cancelled_in = time.monotonic() - t_cancel
    if reply["success"]:  # it finished before the cancel arrived: it must have stopped early
        assert reply["result"]["usage"]["completion_tokens"] < 400
    else:
        assert reply["error_code"] == "cancelled"
        assert cancelled_in < 5.0
    assert time.monotonic() - t0 < 12.0  # 400 tokens would take ~16 s or more
