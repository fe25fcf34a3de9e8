"""The bridge registry (name -> :class:`BridgeConfig`); environment checks are in .environment.

Theory of operation
-------------------
The registry holds one immutable :class:`MLBridgeConfig` snapshot. Readers (``get``, ``list``,
``default``, ``config``) read the current snapshot without locking; writers (``register``,
``update``, ``unregister``, ``set_default``) build a new validated snapshot under a lock and swap
it in, so a reader never sees a half-applied change. Registration checks structure only (cheap,
already done by the frozen config objects); whether the bridge can actually run is
:func:`validate_environment`, which the host calls when it starts a bridge and ``mlbridge doctor``
calls for every bridge.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from ..config import BridgeConfig, MLBridgeConfig
from ..errors import ConfigError, FrameworkNotFoundError
from .builtins import BUILTIN_BRIDGES, BUILTIN_REQUIREMENTS
from .environment import (
    EnvironmentProblem,
    check_environment,
    clear_environment_cache,
    validate_environment,
    worker_environment,
)

__all__ = [
    "EnvironmentProblem",
    "Registry",
    "check_environment",
    "clear_environment_cache",
    "validate_environment",
    "worker_environment",
]


# --------------------------------------------------------------------------- registry


class Registry:
    """Bridge name -> :class:`BridgeConfig`, with a default bridge."""

    def __init__(self, config: MLBridgeConfig | None = None) -> None:
        self._config = config if config is not None else MLBridgeConfig()
        self._lock = threading.Lock()

    @property
    def config(self) -> MLBridgeConfig:
        """The current snapshot (immutable)."""
        return self._config

    @property
    def default(self) -> str | None:
        """The default bridge's name (the first registered unless set); None when empty."""
        return self._config.default_bridge

    def set_default(self, name: str) -> None:
        with self._lock:
            self._require(name)
            self._config = self._config.with_default_bridge(name)

    def register(self, cfg: BridgeConfig, *, replace_existing: bool = False) -> BridgeConfig:
        """Add a bridge (validated again here); a second bridge of the same name is an error
        unless ``replace_existing``."""
        if not isinstance(cfg, BridgeConfig):
            raise ConfigError(
                f"register() takes a BridgeConfig, not {type(cfg).__name__}. Fix: build one "
                "with mlbridge.config.bridge_config(name, ...) or BridgeConfig.from_mapping()"
            )
        cfg = replace(cfg)  # re-runs the structural validation of __post_init__
        with self._lock:
            if cfg.name in self._config.bridges and not replace_existing:
                raise ConfigError(
                    f"bridges.{cfg.name}: a bridge named {cfg.name!r} is already registered. "
                    f"Fix: change it with update({cfg.name!r}, ...), unregister it first, or "
                    "pass replace_existing=True",
                    key_path=f"bridges.{cfg.name}",
                )
            self._config = self._config.with_bridge(cfg)
        return cfg

    def get(self, name: str) -> BridgeConfig:
        cfg = self._config.bridges.get(name)
        if cfg is None:
            raise self._not_found(name)
        return cfg

    def list(self) -> builtins.list[str]:
        """Registered names, in registration order."""
        return builtins.list(self._config.bridges)

    def unregister(self, name: str) -> BridgeConfig:
        """Remove a bridge and return its config; the default moves to the first remaining."""
        with self._lock:
            cfg = self._require(name)
            self._config = self._config.without_bridge(name)
        return cfg

    def update(self, name: str, **changes: Any) -> BridgeConfig:
        """Change a bridge (bridge keys or option names, e.g. ``pool_size=2, timeout=5``)."""
        with self._lock:
            new = self._require(name).replace(**changes)
            self._config = self._config.with_bridge(new)
        return new

    def validate_environment(
        self, name: str, *, timeout: float = 30.0
    ) -> builtins.list[EnvironmentProblem]:
        return validate_environment(self.get(name), timeout=timeout)

    def __contains__(self, name: object) -> bool:
        return name in self._config.bridges

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._config.bridges)

    def __repr__(self) -> str:
        return f"Registry({self.list()!r}, default={self.default!r})"

    def _require(self, name: str) -> BridgeConfig:
        cfg = self._config.bridges.get(name)
        if cfg is None:
            raise self._not_found(name)
        return cfg

    def _not_found(self, name: str) -> FrameworkNotFoundError:
        import difflib

        known = self.list()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        if name in BUILTIN_BRIDGES:
            needs = ", ".join(BUILTIN_REQUIREMENTS[name]) or "nothing"
            hint += (
                f"{name!r} is a built-in bridge that is not registered (it needs: {needs}); "
                f"install those and start it with start_bridge({name!r})"
            )
        else:
            hint += "Register it first (start_bridge, or a [bridges.<name>] table in mlbridge.toml)"
        return FrameworkNotFoundError(
            f"no bridge named {name!r} is registered (registered: {', '.join(known) or 'none'}). "
            f"Fix: {hint}",
            bridge=name,
            known=known,
        )
