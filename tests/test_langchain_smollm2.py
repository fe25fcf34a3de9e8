"""End to end on the real local model: a LangChain chain with no ``llm`` runs on
``local:smollm2``, served by the Transformers pool through the call-back. The model is tiny, so
only the plumbing is asserted (it completes, the answer is non-empty, it streams several
chunks), never the content."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from hf_fixtures import hf_settings
from langchain_helpers import first_chunk_times, lc_env
from mlbridge import BridgeConfig, BridgeOptions, MLBridge, MLBridgeConfig

pytestmark = [
    pytest.mark.langchain,
    pytest.mark.transformers,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

PROMPT = {"messages": [["system", "Answer in one short sentence."], ["human", "{question}"]]}


@pytest.fixture(scope="module")
def bridge(
    hf_cache_dir: Path,
    smollm2_load: dict[str, Any],
) -> Iterator[MLBridge]:
    opts = BridgeOptions(timeout=300.0, startup_timeout=120.0, health_check_interval=2.0)
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


def test_chain_on_the_local_model_completes_and_streams(bridge: MLBridge) -> None:
    rid = bridge.create_resource("langchain", "chain", {"prompt": PROMPT})  # no llm: local
    question = {"question": "What is the capital of France?"}
    answer = bridge.execute_resource("langchain", rid, question, timeout=300)
    assert isinstance(answer, str) and answer.strip()
    stream = bridge.stream_resource("langchain", rid, question, timeout=300)
    chunks, first, total = first_chunk_times(stream)
    assert len(chunks) >= 3 and all(isinstance(c, str) and c for c in chunks)
    assert "".join(chunks) == stream.result and stream.result.strip()
    assert first < total  # token by token: the first piece came before the end
    assert bridge.statistics()["pools"]["transformers"]["requests"] >= 2
