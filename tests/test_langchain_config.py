"""The ``langchain`` pool's defaults: 2 workers + 1 overflow and a longer per-call timeout
(120 s instead of 60 s), from the built-ins and from a ``[bridges.langchain]`` table, where an
explicit option still wins."""

from __future__ import annotations

import pytest

from mlbridge import BridgeOptions, MLBridgeConfig

pytestmark = pytest.mark.langchain


def test_builtin_langchain_pool_defaults() -> None:
    pytest.importorskip("langchain_core")
    cfg = MLBridgeConfig.builtin_defaults().bridges["langchain"]
    assert (cfg.pool_size, cfg.overflow) == (2, 1)
    assert cfg.options.timeout == 120.0 > BridgeOptions().timeout
    assert cfg.options.lazy == BridgeOptions().lazy  # the other options are the usual ones


def test_a_langchain_table_gets_the_longer_timeout_unless_it_sets_one() -> None:
    cfg = MLBridgeConfig.from_mapping(
        {"bridges": {"langchain": {}, "mine": {"python_module": "langchain"}, "echo": {}}}
    )
    assert cfg.bridges["langchain"].options.timeout == 120.0
    assert cfg.bridges["mine"].options.timeout == 120.0  # the built-in under another name
    assert cfg.bridges["echo"].options.timeout == BridgeOptions().timeout
    explicit = MLBridgeConfig.from_mapping(
        {"bridges": {"langchain": {"options": {"timeout": 5, "heartbeat_timeout": 3}}}}
    )
    opts = explicit.bridges["langchain"].options
    assert (opts.timeout, opts.heartbeat_timeout) == (5.0, 3.0)
    kept = MLBridgeConfig.from_mapping({"bridges": {"langchain": {"options": {"max_requests": 9}}}})
    assert kept.bridges["langchain"].options.timeout == 120.0
