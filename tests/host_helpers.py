"""Shared helpers for host tests: echo configs and process checks."""

from __future__ import annotations

import os
import time
from typing import Any

from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig


def echo_cfg(
    name: str = "echo",
    *,
    pool_size: int = 1,
    overflow: int = 0,
    settings: dict[str, Any] | None = None,
    module: str = "echo",
    **options: Any,
) -> BridgeConfig:
    opts = {"health_check_interval": 0.5, "timeout": 20.0, "startup_timeout": 30.0, **options}
    return BridgeConfig(
        name,
        python_module=module,
        pool_size=pool_size,
        overflow=overflow,
        options=BridgeOptions(**opts),
        settings=settings or {},
    )


def config(*bridges: BridgeConfig) -> MLBridgeConfig:
    return MLBridgeConfig(bridges={b.name: b for b in bridges}, default_bridge=bridges[0].name)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(pred: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
