"""``model_ttl``: a Transformers worker unloads models it has not used for that long, and loads
them again on the next call (the tiny GPT-2 fixture, real worker processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hf_fixtures import (
    hf_settings,
    transformers_worker,
)
from host_helpers import config, wait_until
from mlbridge import BridgeConfig, BridgeOptions, MLBridge, errors
from mlbridge.testing import WorkerProcess

pytestmark = pytest.mark.transformers


def _loaded(w: WorkerProcess) -> list[dict[str, Any]]:
    return list(w.request("list_models", {})["loaded"])


def test_unused_models_are_unloaded_and_reloaded_on_next_use(
    hf_cache_dir: Path,
    tiny_gpt2_dir: Path,
) -> None:
    tiny = str(tiny_gpt2_dir)
    args = {"model": tiny, "prompt": "hello world", "max_tokens": 5}
    with transformers_worker(hf_cache_dir, model_ttl="3s") as w:
        first = w.request("generate", args, timeout=120)
        loaded = _loaded(w)
        assert {e["kind"] for e in loaded} >= {"model", "tokenizer"}
        first_load = max(e["loaded_at"] for e in loaded)
        assert wait_until(lambda: _loaded(w) == [], 30, 0.1), _loaded(w)
        again = w.request("generate", args, timeout=120)
        assert again["text"] == first["text"]  # reloaded, same greedy answer
        reloaded = _loaded(w)
        assert reloaded
        assert min(e["loaded_at"] for e in reloaded) > first_load


def test_models_stay_loaded_without_model_ttl(
    hf_cache_dir: Path,
    tiny_gpt2_dir: Path,
) -> None:
    with transformers_worker(hf_cache_dir) as w:
        w.request("tokenize", {"model": str(tiny_gpt2_dir), "text": "hello"}, timeout=120)
        assert not wait_until(lambda: _loaded(w) == [], 1.0, 0.1)
        info = w.request("get_info", {})
        assert {"embed", "tokenize"} <= set(info["cacheable"])


def test_model_ttl_option_reaches_the_worker(
    hf_cache_dir: Path,
    tiny_gpt2_dir: Path,
) -> None:
    tf = BridgeConfig(
        "transformers",
        python_module="transformers",
        options=BridgeOptions(timeout=120.0, startup_timeout=120.0, model_ttl=0.3),
        settings=hf_settings(hf_cache_dir),
    )
    with MLBridge(config(tf), env_overrides=False) as b:
        b.execute("transformers", "tokenize", {"model": str(tiny_gpt2_dir), "text": "hi"})
        assert wait_until(
            lambda: b.execute("transformers", "list_models", {})["loaded"] == [], 30, 0.1
        )


@pytest.mark.parametrize("bad", [0, -1, "soon", True, [1]])
def test_bad_model_ttl_is_refused(bad: Any) -> None:
    from mlbridge.bridges.transformers import _model_ttl

    with pytest.raises(errors.InvalidConfigurationError, match="setting 'model_ttl' must be"):
        _model_ttl(bad)
    assert _model_ttl("1m") == 60.0
    assert _model_ttl(None) is None
    with pytest.raises(errors.ConfigError, match=r"options\.model_ttl"):
        BridgeOptions(model_ttl=-1)
