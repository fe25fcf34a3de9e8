"""The /v1 endpoints on the real local models (``local:smollm2``, ``local:minilm``) through a
real ``mlbridge serve``: the ``openai`` client, DSPy and LangChain unchanged. One server for the
module (slow: the model converts once per test session, ~20-30 s, unless another module did)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway_helpers import Gateway, serving

# the first test also waits for the model conversion and the worker boot: allow for a loaded CI
pytestmark = [
    pytest.mark.gateway,
    pytest.mark.transformers,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    hf_cache_dir: Path,
) -> Iterator[Gateway]:
    # The session's model cache: SmolLM2 is converted there once (by the first test that needs
    # it, here or elsewhere); the worker boot and that conversion get the long timeouts below.
    toml = f"""
[bridges.transformers]
pool_size = 1
[bridges.transformers.options]
timeout = 300
[bridges.transformers.settings]
model_cache_dir = "{hf_cache_dir}"
threads = 2
"""
    with serving(tmp_path_factory.mktemp("gws"), toml) as g:
        with g.client(timeout=600) as c:  # warm: boot the worker, convert and load the model
            r = c.post(
                "/api/frameworks/transformers/execute",
                json={"command": "load_model", "args": {"model": "local:smollm2"}, "timeout": 600},
            )
            assert r.status_code == 200, r.text
        yield g


@pytest.fixture
def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_models_lists_the_local_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"local:smollm2", "local:minilm"} <= ids


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="local:smollm2",
        messages=QUESTION,  # type: ignore[arg-type]
        max_completion_tokens=12,
    )
    text = out.choices[0].message.content
    assert text
    assert out.usage is not None
    assert 0 < out.usage.completion_tokens <= 12
    assert out.choices[0].finish_reason in ("stop", "length")
    stopped = client.chat.completions.create(
        model="local:smollm2",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=24,
        stop=["."],
    )
    assert "." not in (stopped.choices[0].message.content or "")


def test_seeded_sampling_repeats(client: openai.OpenAI) -> None:
    def ask() -> str | None:
        out = client.chat.completions.create(
            model="local:smollm2",
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0.9,
            seed=7,
        )
        return out.choices[0].message.content

    assert ask() == ask()


def test_stream_arrives_before_the_last_token(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="local:smollm2",
        messages=[{"role": "user", "content": "Count from one to twenty in words."}],
        max_completion_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals: list[float] = []
    texts: list[str] = []
    last: Any = None
    for chunk in stream:
        last = chunk
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            texts.append(chunk.choices[0].delta.content)
    assert len(texts) >= 5
    assert last.usage is not None
    assert last.usage.completion_tokens >= 5
    # tokens are made one after another (~25/s here): a buffered reply would arrive at once
    assert arrivals[-1] - arrivals[0] >= 0.1


def test_embeddings_minilm(client: openai.OpenAI) -> None:
    out = client.embeddings.create(model="local:minilm", input=["a cat", "a dog", "tax law"])
    vectors = [d.embedding for d in out.data]
    assert [len(v) for v in vectors] == [384, 384, 384]

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])


def test_dspy_and_langchain_unchanged(gw: Gateway) -> None:
    import dspy
    from langchain_openai import ChatOpenAI

    lm = dspy.LM(
        "openai/local:smollm2",
        api_base=gw.url + "/v1",
        api_key="unused",
        cache=False,
        num_retries=0,
        max_tokens=16,
    )
    out = lm(messages=QUESTION)
    assert isinstance(out[0], str)
    assert out[0]
    llm = ChatOpenAI(
        model="local:smollm2",
        base_url=gw.url + "/v1",
        api_key="unused",  # type: ignore[arg-type]
        max_completion_tokens=16,
        max_retries=0,
    )
    msg = llm.invoke("What is the capital of France?")
    assert isinstance(msg.content, str)
    assert msg.content
    gw.remember_workers()
