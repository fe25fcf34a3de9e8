"""Configuration: frozen, validated objects built from TOML, mappings or ``MLBRIDGE_*`` variables.

Shape (``mlbridge.toml``, or the same under ``[tool.mlbridge]`` in ``pyproject.toml``)::

    default_bridge = "echo"

    [bridges.echo]
    python_module = "echo"          # built-in name, package.module[:Class]   (or python_script)
    pool_size = 2
    overflow = 2
    required_env = []
    required_packages = []

    [bridges.echo.options]
    timeout = 30.0
    max_memory = "2GB"

    [bridges.echo.settings]         # free-form, handed to the worker's bridge
    greeting = "hi"

Every error is a :class:`~mlbridge.errors.ConfigError` naming the key path and the fix.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["BridgeConfig", "BridgeOptions", "MLBridgeConfig"]


@dataclass(frozen=True, slots=True)
class BridgeOptions:
    """Per-bridge knobs. Durations are float seconds; sizes are bytes."""

    timeout: float = 60.0  # default per-call timeout
    startup_timeout: float = 120.0  # spawn -> first successful round trip
    health_check_interval: float = 5.0  # heartbeat period (0 disables)
    heartbeat_timeout: float = 10.0  # a heartbeat unanswered this long -> worker killed
    checkout_timeout: float = 30.0  # wait for a free worker before CheckoutTimeoutError
    cancel_grace: float = 1.0  # after a timeout: cancel, wait this long, then kill
    shutdown_timeout: float = 5.0  # TERM, wait this long, then KILL
    max_requests: int | None = None  # recycle a worker after this many calls
    max_memory: int | None = None  # recycle a worker whose RSS exceeds this (bytes)
    max_age: float | None = None  # recycle a worker older than this (seconds)
    idle_timeout: float = 60.0  # retire overflow workers idle this long
    lazy: bool = True  # start the pool on first use (False: at host start)
    max_frame_bytes: int = 64 * 1024 * 1024
    codec: str = "msgpack"  # negotiated in hello: "msgpack" or "json"
    threads: int | None = None  # cap BLAS/OpenMP threads in the worker
    restart_backoff: float = 0.1  # first restart delay; doubles per consecutive crash
    max_restart_backoff: float = 10.0
    max_boot_failures: int = 3  # consecutive boot failures -> bridge marked broken
    limits: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """One bridge: which worker code to run, with which interpreter, how many, and its settings."""

    name: str
    python_module: str | None = None  # built-in name ("echo"), "pkg.mod", or "pkg.mod:Class"
    python_script: str | None = None  # path to a .py file defining a BaseBridge subclass
    python: str = sys.executable  # interpreter the workers run under
    pool_size: int = 1
    overflow: int = 0
    required_env: tuple[str, ...] = ()
    required_packages: tuple[str, ...] = ()
    options: BridgeOptions = field(default_factory=BridgeOptions)
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def target(self) -> str:
        """What ``python -m mlbridge.worker`` is given: the module spec or the script path."""
        return self.python_script or self.python_module or self.name

    def worker_argv(self, worker_id: str, parent_pid: int) -> list[str]:
        import json

        argv = [
            self.python,
            "-m",
            "mlbridge.worker",
            self.target,
            "--mode",
            "pool-worker",
            "--worker-id",
            worker_id,
            "--parent-pid",
            str(parent_pid),
            "--max-frame-bytes",
            str(self.options.max_frame_bytes),
        ]
        if self.settings:
            argv += ["--settings-json", json.dumps(dict(self.settings))]
        if self.options.limits:
            argv += ["--limits-json", json.dumps(dict(self.options.limits))]
        if self.options.threads:
            argv += ["--threads", str(self.options.threads)]
        return argv


@dataclass(frozen=True, slots=True)
class MLBridgeConfig:
    """The whole host configuration: the bridges and which one is the default."""

    bridges: Mapping[str, BridgeConfig] = field(default_factory=lambda: MappingProxyType({}))
    default_bridge: str | None = None
