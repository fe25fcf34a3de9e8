"""Which configuration a command runs with, and where it came from.

``--config PATH``, else ``$MLBRIDGE_CONFIG``, else the nearest ``mlbridge.toml`` (or
``pyproject.toml`` with ``[tool.mlbridge]``), else the built-in bridges; then the ``MLBRIDGE_*``
variables over it. That is :meth:`MLBridgeConfig.load`, the same rule ``MLBridge()`` follows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .._config_load import find_config_file
from ..config import MLBridgeConfig

__all__ = ["LoadedConfig", "config_source", "load_config"]


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    config: MLBridgeConfig
    source: str  # a file path, or "built-in defaults"
    env_overrides: tuple[str, ...]  # the MLBRIDGE_* variables that were applied


def config_source(path: str | None) -> str:
    """The file a load would read (without reading it), or ``"built-in defaults"``."""
    explicit = path or os.environ.get("MLBRIDGE_CONFIG") or None
    if explicit is not None:
        return str(explicit)
    found = find_config_file()
    return str(found) if found is not None else "built-in defaults"


def _env_vars() -> tuple[str, ...]:
    ignored = ("MLBRIDGE_CONFIG", "MLBRIDGE_WORKER")
    return tuple(
        sorted(v for v in os.environ if v.startswith("MLBRIDGE_") and not v.startswith(ignored))
    )


def load_config(path: str | None) -> LoadedConfig:
    """Load the config; raises :class:`~mlbridge.errors.ConfigError` naming the key path."""
    source = config_source(path)
    cfg = MLBridgeConfig.load(path)
    return LoadedConfig(cfg, source, _env_vars())
