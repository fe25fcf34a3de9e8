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

Durations are float seconds or strings (``"250ms"``, ``"30s"``, ``"5m"``); sizes are bytes or
strings (``"512MB"``, ``"2GiB"``). A bridge whose name is a built-in (``echo``, ``transformers``,
``dspy``, ``langchain``, ``sandbox``) needs neither ``python_module`` nor ``python_script``.

Sources: :meth:`MLBridgeConfig.from_mapping`, :meth:`~MLBridgeConfig.from_toml`,
:meth:`~MLBridgeConfig.from_env` (``MLBRIDGE_DEFAULT_BRIDGE``,
``MLBRIDGE_BRIDGES__ECHO__POOL_SIZE=2``, ``MLBRIDGE_BRIDGES__ECHO__OPTIONS__TIMEOUT=5``: double
underscores nest, values are JSON when they parse, else strings), :meth:`~MLBridgeConfig.discover`
and :meth:`~MLBridgeConfig.load` (file or built-ins, then the environment over it).

Every error is a :class:`~mlbridge.errors.ConfigError` naming the source, the key path, the bad
value and the fix. Objects built directly in code are validated too (``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import _config_load as _load
from . import _config_values as _values
from . import _redact
from ._config_gateway import GatewaySettings
from ._scaleout_config import EnvironmentSpec, RayConfig, RayOptions, as_ray_config
from .errors import ConfigError

__all__ = [
    "BridgeConfig",
    "BridgeOptions",
    "EnvironmentSpec",
    "MLBridgeConfig",
    "RayConfig",
    "RayOptions",
    "bridge_config",
]


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
    max_memory: int | None = None  # hard memory limit (bytes): cgroup memory.max, else RLIMIT_AS
    max_age: float | None = None  # recycle a worker older than this (seconds)
    idle_timeout: float = 60.0  # retire overflow workers idle this long
    lazy: bool = True  # start the pool on first use (False: at host start)
    max_frame_bytes: int = 64 * 1024 * 1024
    backend: str = "local"  # where workers run: see mlbridge._backends (local today)
    codec: str = "msgpack"  # negotiated in hello: "msgpack" or "json"
    threads: int | None = None  # cap BLAS/OpenMP threads in the worker
    restart_backoff: float = 0.1  # first restart delay; doubles per consecutive crash
    max_restart_backoff: float = 10.0
    max_boot_failures: int = 3  # consecutive boot failures -> bridge marked broken
    limits: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    # OS-enforced limits and isolation (issue 16; see mlbridge._backends.isolation). None: the
    # bridge's default (the sandbox bridge turns isolation and limits on, others leave them off)
    max_cpu: float | None = (
        None  # percent of one CPU ("50%", "200%"): cgroup cpu.max, else affinity
    )
    max_processes: int | None = None  # processes + threads: cgroup pids.max, else RLIMIT_NPROC
    max_open_files: int | None = None  # RLIMIT_NOFILE
    network: bool | None = None  # False: a network namespace with only loopback
    env_allowlist: tuple[str, ...] | None = None  # host variables the worker inherits
    private_tmp: bool | None = None  # a private working/temp directory, removed on exit
    read_only: bool | None = None  # a read-only view of the file system (but the private dir)
    # The host's result cache for cacheable commands: a duration, or {command = duration};
    # None (the default) turns it off. See mlbridge._config_perf.
    cache_ttl: Mapping[str, float] | float | str | None = None
    cache_max_entries: int = 1024  # entries kept per bridge (least recently used goes first)
    cache_max_bytes: int = 64 * 1024 * 1024  # encoded result bytes kept per bridge
    # A worker unloads models it has not used for this long (handed to the worker as the
    # ``model_ttl`` setting unless settings name one; the Transformers bridge honours it).
    model_ttl: float | None = None
    # Arrays and byte strings of at least this many bytes cross through shared memory
    # (/dev/shm), only a handle in the frame; 0 turns it off. See mlbridge._shm.
    shm_threshold_bytes: int = 1024 * 1024
    # Each side of a worker's channel writes them into a pool of reused, pre-faulted segments
    # of at most this many bytes (kept until the worker exits); 0: a new file every time.
    shm_pool_bytes: int = 512 * 1024 * 1024
    # How workers start: "spawn" (a fresh interpreter each) or "fork" (forked from a warm
    # template that imported the bridge once; see mlbridge._backends.fork).
    start: str = "spawn"

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        ctx, path = _values.validation_context("options")
        for key, value in _load.validate_options(ctx, path, values).items():
            if value is not values[key]:
                object.__setattr__(self, key, value)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], *, path: str = "options", source: str | None = None
    ) -> BridgeOptions:
        """Options from a mapping; missing keys keep their defaults."""
        return _load.options_from_mapping(_load.Ctx(source=source), path, data)

    def to_mapping(self) -> dict[str, Any]:
        """Plain values (``None`` left out) that :meth:`from_mapping` reads back."""
        return _load.options_to_mapping(self)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (MappingProxyType is not)
        return _rebuild, (type(self), _plain_fields(self))


#: BridgeConfig's default options: a built-in bridge (langchain, dspy) gets its own defaults
#: instead, as it does from a config file (identity, not equality: explicit values win).
_DEFAULT_OPTIONS = BridgeOptions()


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """One bridge: which worker code to run, with which interpreter, how many, and its settings."""

    name: str
    python_module: str | None = None  # built-in name ("echo"), "pkg.mod", or "pkg.mod:Class"
    python_script: str | None = None  # path to a .py file defining a BaseBridge subclass
    python: str = sys.executable  # interpreter the workers run under
    # -1 (the default): the built-in bridge's default (langchain 2 + 1, dspy 4 + 2), else 1 / 0
    pool_size: int = _load.AUTO_SIZE
    overflow: int = _load.AUTO_SIZE
    required_env: tuple[str, ...] = ()
    required_packages: tuple[str, ...] = ()
    options: BridgeOptions = _DEFAULT_OPTIONS
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    environment: EnvironmentSpec | None = None  # its own uv-built environment (issue 14)
    ray: RayOptions | None = None  # per-actor Ray resources, for options.backend = "ray"

    def __post_init__(self) -> None:
        values = {key: getattr(self, key) for key in _values.BRIDGE_KEYS}
        values = _load.with_builtin_defaults(
            self.name, values, default_options=self.options is _DEFAULT_OPTIONS
        )
        ctx, path = _values.validation_context(f"bridges.{self.name}")
        clean = _load.validate_bridge(ctx, path, self.name, values)
        for key, value in clean.items():
            if value is not getattr(self, key):
                object.__setattr__(self, key, value)

    @classmethod
    def from_mapping(
        cls,
        name: str,
        data: Mapping[str, Any],
        *,
        path: str | None = None,
        source: str | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> BridgeConfig:
        """One bridge from its table (``data``); ``path`` is the key path errors name.

        Relative ``python_script`` / ``python`` paths resolve against ``base_dir`` when given.
        """
        ctx = _load.Ctx(source=source, base_dir=None if base_dir is None else Path(base_dir))
        path = f"bridges.{name}" if path is None else path
        _values.check_name(ctx, path, name)
        return _load.bridge_from_mapping(ctx, path, name, data)

    def to_mapping(self) -> dict[str, Any]:
        """Plain values (TOML/JSON types) that :meth:`from_mapping` reads back."""
        return _load.bridge_to_mapping(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), _plain_fields(self))

    def replace(self, **changes: Any) -> BridgeConfig:
        """A validated copy with ``changes``: bridge keys, or option names (``timeout=5``).

        Setting ``python_script`` drops ``python_module`` and vice versa.
        """
        ctx = _load.Ctx()
        path = f"bridges.{self.name}"
        raw = _load.apply_changes(ctx, path, self.to_mapping(), changes)
        return _load.bridge_from_mapping(ctx, path, self.name, raw)

    @property
    def target(self) -> str:
        """What ``python -m mlbridge.worker`` is given: the module spec or the script path."""
        return self.python_script or self.python_module or self.name

    def __repr__(self) -> str:
        # settings and env often carry API keys: never show their values in a repr or a log line
        fields = ", ".join(
            f"{f.name}={_redact.redact(getattr(self, f.name))!r}"
            if f.name in ("settings", "env")
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        )
        return f"BridgeConfig({fields})"


@dataclass(frozen=True, slots=True)
class MLBridgeConfig:
    """The whole host configuration: the bridges and which one is the default."""

    bridges: Mapping[str, BridgeConfig] = field(default_factory=lambda: MappingProxyType({}))
    default_bridge: str | None = None  # unset: the first configured bridge
    ray: RayConfig = field(default_factory=RayConfig)  # the [ray] table (backend = "ray")
    # [gateway]: how `mlbridge serve` listens (see mlbridge._config_gateway)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)

    def __post_init__(self) -> None:
        ctx, _ = _values.validation_context("")
        if not isinstance(self.bridges, Mapping):
            raise ctx.error("bridges", "must be a mapping of name -> BridgeConfig", "pass a dict")
        for name, cfg in self.bridges.items():
            if not isinstance(cfg, BridgeConfig):
                raise ctx.error(
                    f"bridges.{name}",
                    f"must be a BridgeConfig, not {type(cfg).__name__}",
                    "build it with BridgeConfig(...) or BridgeConfig.from_mapping(...)",
                )
            if cfg.name != name:
                raise ctx.error(
                    f"bridges.{name}",
                    f"holds the bridge named {cfg.name!r}",
                    "key each bridge by its own name",
                )
        object.__setattr__(self, "bridges", MappingProxyType(dict(self.bridges)))
        object.__setattr__(self, "ray", as_ray_config(ctx, "ray", self.ray))
        default = _load.check_default(ctx, list(self.bridges), self.default_bridge)
        object.__setattr__(self, "default_bridge", default)

    # -- loaders

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        *,
        source: str = "<mapping>",
        base_dir: str | os.PathLike[str] | None = None,
    ) -> MLBridgeConfig:
        """The config from a mapping shaped like ``mlbridge.toml``."""
        ctx = _load.Ctx(source=source, base_dir=None if base_dir is None else Path(base_dir))
        return _load.config_from_mapping(ctx, data)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> MLBridgeConfig:
        """Read ``mlbridge.toml``, or ``[tool.mlbridge]`` of a file named ``pyproject.toml``.

        Relative ``python_script`` / ``python`` paths resolve against the file's folder.
        """
        return _load.read_toml(path)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, base: MLBridgeConfig | None = None
    ) -> MLBridgeConfig:
        """``MLBRIDGE_*`` variables (default ``os.environ``) merged over ``base``.

        ``MLBRIDGE_DEFAULT_BRIDGE=echo``, ``MLBRIDGE_BRIDGES__ECHO__POOL_SIZE=2``,
        ``MLBRIDGE_BRIDGES__ECHO__OPTIONS__TIMEOUT=5s``, ``MLBRIDGE_BRIDGES__ECHO__SETTINGS__X=y``,
        ``MLBRIDGE_BRIDGES__ECHO__ENV__API_KEY=...``. Keys match case-insensitively (``env``
        names keep their case). Values are JSON when they parse, else strings (paths, module
        names, ``env`` values and ``default_bridge`` are always strings). Other ``MLBRIDGE_*``
        variables are ignored unless they look like a misspelt config key.
        """
        return _load.from_env(environ, base)

    @classmethod
    def discover(cls, start_dir: str | os.PathLike[str] | None = None) -> MLBridgeConfig | None:
        """The nearest ``mlbridge.toml`` (or ``pyproject.toml`` with ``[tool.mlbridge]``) from
        ``start_dir`` (default: the working directory) upwards; ``None`` when there is none.
        In one folder ``mlbridge.toml`` wins over ``pyproject.toml``."""
        found = _load.find_config_file(start_dir)
        return None if found is None else _load.read_toml(found)

    @classmethod
    def builtin_defaults(cls) -> MLBridgeConfig:
        """``echo`` plus every framework bridge whose packages this interpreter has, all lazy.

        Availability is checked with ``importlib.util.find_spec``: no framework is imported.
        """
        return _load.builtin_defaults()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        start_dir: str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> MLBridgeConfig:
        """What ``MLBridge()`` uses: ``path``, else ``$MLBRIDGE_CONFIG``, else :meth:`discover`,
        else :meth:`builtin_defaults`; then the ``MLBRIDGE_*`` variables over it."""
        return _load.load(path, start_dir, environ)

    def to_mapping(self) -> dict[str, Any]:
        """Plain values that :meth:`from_mapping` reads back to an equal config."""
        return _load.config_to_mapping(self)

    # -- derived configs

    def with_bridge(self, cfg: BridgeConfig) -> MLBridgeConfig:
        """A copy with ``cfg`` added, or replacing the bridge of the same name."""
        if not isinstance(cfg, BridgeConfig):
            raise ConfigError(
                f"with_bridge() takes a BridgeConfig, not {type(cfg).__name__}. "
                "Fix: build one with bridge_config(name, ...) or BridgeConfig.from_mapping()"
            )
        return MLBridgeConfig(
            {**self.bridges, cfg.name: cfg}, self.default_bridge, self.ray, self.gateway
        )

    def without_bridge(self, name: str) -> MLBridgeConfig:
        """A copy without bridge ``name``; the default moves to the first remaining bridge."""
        self._require(name)
        rest = {n: b for n, b in self.bridges.items() if n != name}
        default = None if self.default_bridge == name else self.default_bridge
        return MLBridgeConfig(rest, default, self.ray, self.gateway)

    def replace_bridge(self, name: str, **changes: Any) -> MLBridgeConfig:
        """A copy with bridge ``name`` changed (see :meth:`BridgeConfig.replace`)."""
        return self.with_bridge(self._require(name).replace(**changes))

    def with_default_bridge(self, name: str) -> MLBridgeConfig:
        self._require(name)
        return MLBridgeConfig(self.bridges, name, self.ray, self.gateway)

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), _plain_fields(self))

    def _require(self, name: str) -> BridgeConfig:
        cfg = self.bridges.get(name)
        if cfg is None:
            known = ", ".join(self.bridges) or "none"
            raise ConfigError(
                f"bridges.{name}: no bridge named {name!r} is configured (configured: {known}). "
                f"Fix: {_values.suggest(name, self.bridges)}Use a configured name, or add it with "
                "with_bridge()",
                key_path=f"bridges.{name}",
            )
        return cfg


def _plain_fields(obj: Any) -> dict[str, Any]:
    return {
        f.name: dict(v) if isinstance(v := getattr(obj, f.name), MappingProxyType) else v
        for f in dataclasses.fields(obj)
    }


def _rebuild(cls: type[Any], kwargs: dict[str, Any]) -> Any:
    return cls(**kwargs)


def bridge_config(name: str, **kwargs: Any) -> BridgeConfig:
    """A validated :class:`BridgeConfig` from keywords, as ``start_bridge`` takes them.

    ``bridge_config("mine", python_script="bridge.py", pool_size=2, timeout="30s")``: keywords
    that are :class:`BridgeOptions` fields go into ``options``; ``settings`` and ``env`` are taken
    as given; anything else is a :class:`ConfigError`.
    """
    ctx = _load.Ctx()
    path = f"bridges.{name}"
    _values.check_name(ctx, path, name)
    raw = _load.apply_changes(ctx, path, {}, kwargs)
    return _load.bridge_from_mapping(ctx, path, name, raw)


_load.register_types(BridgeOptions, BridgeConfig, MLBridgeConfig)
