"""The public surface is small and pinned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import mlbridge


def test_all_is_pinned() -> None:
    assert sorted(mlbridge.__all__) == [
        "AsyncMLBridge",
        "AsyncSession",
        "BaseBridge",
        "BridgeConfig",
        "BridgeOptions",
        "CallContext",
        "HealthEvent",
        "MLBridge",
        "MLBridgeConfig",
        "RequestEvent",
        "ResourceType",
        "Session",
        "WorkerEvent",
        "__version__",
        "bridge_config",
        "errors",
    ]
    for name in mlbridge.__all__:
        assert hasattr(mlbridge, name), name


def test_importing_mlbridge_imports_no_framework() -> None:
    code = (
        "import sys, mlbridge; from mlbridge import MLBridge; "
        "bad = [m for m in ('torch', 'transformers', 'dspy', 'langchain_core', "
        "'sentence_transformers', 'numpy') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_bridge_runs_echo_with_no_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no mlbridge.toml here or above the temp dir
    monkeypatch.delenv("MLBRIDGE_CONFIG", raising=False)
    with mlbridge.MLBridge() as b:
        assert "echo" in b.list_frameworks()
        assert b.execute("echo", "echo", {"k": "v"}) == {"k": "v"}


def test_a_worker_imports_no_host_code_and_no_asyncio() -> None:
    code = (
        "import sys; from mlbridge.bridges.base import BaseBridge; "
        "import mlbridge._worker.serve, mlbridge._worker.entry, mlbridge.bridges.echo; "
        "bad = sorted(m for m in sys.modules if m.startswith(('mlbridge._host', 'mlbridge._api', "
        "'mlbridge.config', 'mlbridge.cli', 'asyncio'))); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
