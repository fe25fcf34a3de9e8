"""The LangChain bridge's local chat model through the call-back into the Transformers pool.

``HostChatModel`` sends each generation to ``transformers:chat`` through the host; here it runs
the tiny GPT-2 of ``hf_fixtures`` (deterministic under greedy decoding, loads in milliseconds),
so the plumbing is checked fast: invoke, token-by-token streaming, and an agent refusing a model
that cannot call tools. The real SmolLM2 end-to-end test is ``test_langchain_smollm2.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")

from hf_fixtures import hf_settings
from langchain_helpers import lc_env, tool_call
from mlbridge import BridgeConfig, BridgeOptions, MLBridge, MLBridgeConfig, errors

pytestmark = [pytest.mark.langchain, pytest.mark.transformers, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def bridge(hf_cache_dir: Path) -> Iterator[MLBridge]:
    opts = BridgeOptions(timeout=120.0, startup_timeout=120.0, health_check_interval=1.0)
    cfg = MLBridgeConfig(
        bridges={
            "transformers": BridgeConfig(
                "transformers",
                python_module="transformers",
                settings=hf_settings(hf_cache_dir),
                options=opts,
            ),
            "langchain": BridgeConfig(
                "langchain", python_module="langchain", pool_size=1, env=lc_env(), options=opts
            ),
        },
        default_bridge="langchain",
    )
    with MLBridge(cfg, env_overrides=False) as b:
        yield b


def test_local_model_invokes_and_streams_through_the_transformers_pool(
    bridge: MLBridge,
    tiny_gpt2_dir: Path,
) -> None:
    llm = {"provider": "mlbridge", "model": str(tiny_gpt2_dir), "max_tokens": 12}
    config = {"prompt": {"messages": [["system", "be brief"], ["human", "{q}"]]}, "llm": llm}
    rid = bridge.create_resource("langchain", "chain", config)
    before = bridge.statistics()["pools"]["transformers"]["requests"]
    text = bridge.execute_resource("langchain", rid, {"q": "hello"})
    assert isinstance(text, str) and text
    stream = bridge.stream_resource("langchain", rid, {"q": "hello"})
    chunks = list(stream)
    # Greedy decoding: the streamed deltas are the same reply, one piece per token or so.
    assert "".join(chunks) == stream.result == text
    assert len(chunks) >= 3 and all(chunks)
    # The LangChain worker holds no model: the Transformers pool generated both replies.
    assert bridge.statistics()["pools"]["transformers"]["requests"] >= before + 2


def test_an_agent_tool_gets_an_embedding_from_the_transformers_bridge(bridge: MLBridge) -> None:
    call = tool_call("embedding_size", {"text": "a cat"}, "e1")
    turns = [{"content": "", "tool_calls": [call]}, "384 dimensions"]
    llm = {"class": "langchain_helpers:ToolCallingFakeModel", "kwargs": {"turns": turns}}
    aid = bridge.create_resource(
        "langchain", "agent", {"llm": llm, "tools": ["langchain_helpers:embedding_size"]}
    )
    out = bridge.execute_resource("langchain", aid, {"input": "how big?"})
    assert out["steps"] == [{"tool": "embedding_size", "args": {"text": "a cat"}, "result": "384"}]
    assert out["output"] == "384 dimensions"


def test_an_agent_needs_a_model_that_calls_tools(bridge: MLBridge) -> None:
    with pytest.raises(errors.InvalidConfigurationError, match="tool calling"):
        bridge.create_resource("langchain", "agent", {"tools": ["langchain_helpers:add"]})
