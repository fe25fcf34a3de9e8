"""The Transformers bridge through MLBridge: host-owned pipelines, sessions, kill -9, call-backs."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from hf_fixtures import hf_settings
from host_helpers import echo_cfg, wait_until
from mlbridge import BridgeConfig, BridgeOptions, MLBridge, MLBridgeConfig, errors


@pytest.fixture(scope="module")
def bridge(hf_cache_dir: Path) -> Iterator[MLBridge]:
    tf = BridgeConfig(
        "transformers",
        python_module="transformers",
        pool_size=1,
        options=BridgeOptions(timeout=120.0, startup_timeout=120.0, health_check_interval=1.0),
        settings=hf_settings(hf_cache_dir),
    )
    cfg = MLBridgeConfig(
        bridges={"transformers": tf, "echo": echo_cfg(pool_size=1)}, default_bridge="echo"
    )
    with MLBridge(cfg, env_overrides=False) as b:
        yield b


def _pid(b: MLBridge) -> int:
    workers = b.statistics()["pools"]["transformers"]["workers"]
    assert len(workers) == 1
    return int(workers[0]["pid"])


def test_pipeline_resource_is_rebuilt_after_kill_9_and_answers_the_same(
    bridge: MLBridge,
    tiny_gpt2_dir: Path,
) -> None:
    rid = bridge.create_resource(
        "transformers", "pipeline", {"task": "text-generation", "model": str(tiny_gpt2_dir)}
    )
    inputs = {"inputs": "the quick brown", "max_new_tokens": 10, "do_sample": False}
    first = bridge.execute_resource("transformers", rid, inputs)
    old = _pid(bridge)
    os.kill(old, signal.SIGKILL)
    assert wait_until(
        lambda: (
            [w["pid"] for w in bridge.statistics()["pools"]["transformers"]["workers"]]
            not in ([], [old])
        ),
        60,
    )
    again = bridge.execute_resource("transformers", rid, inputs)
    assert again == first
    assert _pid(bridge) != old
    listed = bridge.list_resources("transformers", "pipeline")
    assert [r["resource_id"] for r in listed] == [rid]
    assert listed[0]["execution_count"] == 2


def test_session_groups_pipeline_and_closing_deletes_it(
    bridge: MLBridge,
    tiny_gpt2_dir: Path,
) -> None:
    with bridge.session("transformers") as s:
        rid = s.create_resource("tokenizer", {"model": str(tiny_gpt2_dir)})
        ids = s.execute_resource(rid, {"text": "hello world"})["ids"]
        assert s.execute_resource(rid, {"ids": ids})["text"] == "hello world"
    assert all(r["resource_id"] != rid for r in bridge.list_resources("transformers"))
    with pytest.raises(errors.ResourceNotFoundError):
        bridge.execute_resource("transformers", rid, {"text": "x"})


def test_another_bridge_uses_the_transformers_pool_through_a_callback(
    bridge: MLBridge,
    tiny_gpt2_dir: Path,
) -> None:
    # The pattern DSPy and LangChain workers use to share the local model.
    direct = bridge.execute(
        "transformers",
        "generate",
        {"model": str(tiny_gpt2_dir), "prompt": "hello", "max_tokens": 6, "temperature": 0},
    )
    via_echo = bridge.execute(
        "echo",
        "call_host",
        {
            "bridge": "transformers",
            "command": "generate",
            "args": {
                "model": str(tiny_gpt2_dir),
                "prompt": "hello",
                "max_tokens": 6,
                "temperature": 0,
            },
        },
    )
    assert via_echo["text"] == direct["text"]
    assert via_echo["usage"] == direct["usage"]


def test_streamed_chat_through_the_host(
    bridge: MLBridge,
    tiny_gpt2_dir: Path,
) -> None:
    chunks = list(
        bridge.stream(
            "transformers",
            "chat",
            {
                "model": str(tiny_gpt2_dir),
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 12,
                "temperature": 0,
            },
        )
    )
    deltas = [c["delta"] for c in chunks if "delta" in c]
    assert len(deltas) >= 2
    final = bridge.execute(
        "transformers",
        "chat",
        {
            "model": str(tiny_gpt2_dir),
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 12,
            "temperature": 0,
        },
    )
    assert "".join(deltas) == final["message"]["content"]


def test_missing_model_is_a_typed_error_naming_it(bridge: MLBridge, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(errors.ModelError, match="nope"):
        bridge.create_resource(
            "transformers", "pipeline", {"task": "text-generation", "model": missing}
        )
    assert all(r["config"].get("model") != missing for r in bridge.list_resources("transformers"))
