"""The OpenAI-compatible /v1 endpoints against a real ``mlbridge serve``, through the official
``openai`` client, DSPy and LangChain, unchanged. Backed here by the tiny LM test bridge (the
same command contract as the Transformers bridge; the real smollm2 runs in
test_gateway_smollm2.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway_helpers import Gateway, serving, sse_events

pytestmark = pytest.mark.gateway

TOKEN = "gw-test-token-7f3a9c"
CONFIG = """
[bridges.echo]
[bridges.tinylm]
python_script = "@BRIDGES@/tiny_lm.py"
[bridges.tinylm.settings]
token_delay = 0.05
[gateway]
openai_bridge = "tinylm"
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with serving(tmp_path_factory.mktemp("gwo"), CONFIG, token=TOKEN) as g:
        yield g


@pytest.fixture
def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=TOKEN, max_retries=0, timeout=60)


def test_models(client: openai.OpenAI, gw: Gateway) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["tiny:chat", "tiny:embed"]
    with gw.client() as c:  # a model resource the user loads is listed too
        r = c.post(
            "/api/frameworks/tinylm/resources",
            json={"type": "model", "config": {"prefix": "custom:"}, "resource_id": "my-model"},
        )
        assert r.status_code == 201, r.text
    assert "my-model" in [m.id for m in client.models.list()]
    out = client.chat.completions.create(
        model="my-model", messages=[{"role": "user", "content": "hello"}]
    )
    assert out.choices[0].message.content == "custom: hello"


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny:chat",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "one two three"},
        ],
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "you said: one two three"
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None
    assert out.usage.completion_tokens == 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_max_tokens_max_completion_tokens_and_stop(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "a b c d e f"}]
    out = client.chat.completions.create(model="tiny:chat", messages=msgs, max_tokens=3)  # type: ignore[arg-type]
    assert out.choices[0].message.content == "you said: a"
    assert out.choices[0].finish_reason == "length"
    out = client.chat.completions.create(
        model="tiny:chat",
        messages=msgs,  # type: ignore[arg-type]
        max_tokens=3,
        max_completion_tokens=4,  # wins over max_tokens
    )
    assert out.choices[0].message.content == "you said: a b"
    out = client.chat.completions.create(model="tiny:chat", messages=msgs, stop=["c"])  # type: ignore[arg-type]
    assert out.choices[0].message.content == "you said: a b"


def test_seed_and_temperature(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "w1 w2 w3 w4 w5 w6 w7 w8"}]

    def ask(seed: int) -> str | None:
        out = client.chat.completions.create(
            model="tiny:chat",
            messages=msgs,  # type: ignore[arg-type]
            temperature=1.0,
            seed=seed,
        )
        return out.choices[0].message.content

    assert ask(1) == ask(1)
    assert ask(1) != ask(2)
    greedy = client.chat.completions.create(model="tiny:chat", messages=msgs, temperature=0)  # type: ignore[arg-type]
    assert greedy.choices[0].message.content == "you said: " + msgs[0]["content"]


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny:chat",
        messages=[{"role": "user", "content": "x y z"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "you said: x y z"
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_and_incremental(gw: Gateway) -> None:
    arrivals: list[float] = []
    events = []
    body = {
        "model": "tiny:chat",
        "messages": [{"role": "user", "content": " ".join(f"t{i}" for i in range(20))}],
        "stream": True,
    }
    with gw.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for ev in sse_events(r.iter_lines()):
            arrivals.append(time.monotonic())
            events.append(ev[1])
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    # 22 tokens at 0.05 s each: the first content arrived long before the last was made
    assert arrivals[-1] - arrivals[1] >= 0.5


def test_embeddings(client: openai.OpenAI, gw: Gateway) -> None:
    out = client.embeddings.create(model="tiny:embed", input=["alpha", "beta"])  # base64 wire
    assert [d.index for d in out.data] == [0, 1]
    assert len(out.data[0].embedding) == 8
    assert abs(sum(x * x for x in out.data[0].embedding) - 1.0) < 1e-4
    floats = client.embeddings.create(model="tiny:embed", input="alpha", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(out.data[0].embedding, abs=1e-6)
    with gw.client() as c:
        r = c.post("/v1/embeddings", json={"model": "tiny:embed", "input": [[1, 2, 3]]})
        assert r.status_code == 400
        assert "text" in r.json()["error"]["message"]


def test_errors_in_openai_shape(client: openai.OpenAI, gw: Gateway) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    err = info.value.body
    assert isinstance(err, dict)
    assert "no-such-model" in err["message"]
    assert err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny:chat", messages=[])
    assert "messages" in str(bad.value)
    with gw.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny:chat", "messages": "hi"})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "messages"
        r = c.post(
            "/v1/chat/completions",
            json={"model": "tiny:chat", "messages": [{"role": "user", "content": "x"}], "n": 2},
        )
        assert r.status_code == 400


def test_auth_on(gw: Gateway) -> None:
    assert httpx.get(gw.url + "/healthz").status_code == 200  # health needs no token
    assert httpx.get(gw.url + "/readyz").status_code == 200
    for path in ("/v1/models", "/api/stats", "/openapi.json"):
        r = httpx.get(gw.url + path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "missing_token"
    r = httpx.get(gw.url + "/api/stats", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_token"
    assert "wrong" not in r.text
    bad = openai.OpenAI(base_url=gw.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    ok = httpx.get(gw.url + "/api/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200
    assert TOKEN not in ok.text
    assert TOKEN not in gw.stderr()  # never in a log line
    assert TOKEN not in (gw.runtime_dir / "gateway.json").read_text()


def test_workers_never_see_the_token(gw: Gateway) -> None:
    with gw.client() as c:
        r = c.post(
            "/api/frameworks/echo/execute",
            json={"command": "env", "args": {"name": "MLBRIDGE_TOKEN"}},
        )
    assert r.status_code == 200, r.text
    assert r.json() == {"result": None}


def test_langchain_chat_openai(gw: Gateway) -> None:
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    llm = ChatOpenAI(
        model="tiny:chat", base_url=gw.url + "/v1", api_key=TOKEN, max_retries=0, temperature=0
    )
    msg = llm.invoke("hello from langchain")
    assert msg.content == "you said: hello from langchain"
    pieces = [c.content for c in llm.stream("streamed words")]
    assert "".join(str(p) for p in pieces) == "you said: streamed words"
    emb = OpenAIEmbeddings(
        model="tiny:embed",
        base_url=gw.url + "/v1",
        api_key=TOKEN,
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    assert len(emb.embed_query("alpha")) == 8


def test_dspy_lm(gw: Gateway) -> None:
    import dspy

    lm = dspy.LM(
        "openai/tiny:chat", api_base=gw.url + "/v1", api_key=TOKEN, cache=False, num_retries=0
    )
    out = lm(messages=[{"role": "user", "content": "dspy says hi"}])
    assert out == ["you said: dspy says hi"]


def test_workers_are_remembered_for_the_leak_check(gw: Gateway) -> None:
    assert gw.remember_workers()
