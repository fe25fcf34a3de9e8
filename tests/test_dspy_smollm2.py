"""A real DSPy program on the local SmolLM2 model: the DSPy worker's default LM calls the
Transformers pool through the host. The model is tiny, so only the plumbing is asserted
(the program completes and returns its output fields), never the content."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dspy")

from dspy_helpers import dspy_env
from hf_fixtures import hf_settings
from mlbridge import BridgeConfig, BridgeOptions, MLBridge, MLBridgeConfig

pytestmark = [
    pytest.mark.dspy,
    pytest.mark.transformers,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def bridge(
    hf_cache_dir: Path,
    smollm2_load: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
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
            "dspy": BridgeConfig(
                "dspy",
                python_module="dspy",
                pool_size=1,  # the built-in default is 4 + 2
                env=dspy_env(tmp_path_factory.mktemp("dspy-local")),
                options=opts,
            ),
        },
        default_bridge="dspy",
    )
    with MLBridge(cfg, env_overrides=False) as b:
        yield b


def test_program_runs_on_the_local_model_by_default(bridge: MLBridge) -> None:
    assert bridge.execute("dspy", "get_lm")["lm"] is None  # nothing configured: the default
    rid = bridge.create_resource("dspy", "program", {"signature": "question -> answer", "lm": None})
    result = bridge.execute_resource(
        "dspy", rid, {"question": "What is the capital of France?"}, timeout=300
    )
    assert set(result["outputs"]) == {"answer"}
    assert isinstance(result["outputs"]["answer"], str)
    usage = result["usage"]
    assert usage["prompt_tokens"] > 20 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # The DSPy worker holds no model: the Transformers worker does the generation.
    stats = bridge.statistics()["pools"]
    assert stats["transformers"]["requests"] >= 1


def test_an_optimised_program_streams_its_fields_from_the_local_model(bridge: MLBridge) -> None:
    # Two labeled demos show the small model DSPy's answer format (it then follows it).
    rid = bridge.create_resource("dspy", "program", {"signature": "question -> answer"})
    trainset = [
        {"question": "What is the capital of Italy?", "answer": "Rome"},
        {"question": "What colour is the sky?", "answer": "Blue"},
    ]
    out = bridge.execute(
        "dspy",
        "optimize",
        {"program": rid, "optimizer": "labeled_few_shot", "trainset": trainset, "params": {"k": 2}},
    )
    assert out["demos"] == 2
    stream = bridge.stream_resource(
        "dspy", rid, {"question": "What is the capital of France?"}, timeout=300
    )
    chunks = list(stream)
    assert chunks, "no stream chunks"
    assert all(set(c) == {"field", "delta", "predictor"} for c in chunks)
    assert {c["field"] for c in chunks} == {"answer"}
    streamed = "".join(c["delta"] for c in chunks).strip()
    assert streamed
    assert stream.result["outputs"]["answer"] == streamed
