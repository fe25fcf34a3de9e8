"""Parsing and loading behind :mod:`mlbridge.config`: options, bridges, files, environment.

One validator per key (:mod:`mlbridge._config_values` for single values). Validation happens in
one place, the dataclasses' ``__post_init__``: a loader builds each object inside
:func:`~mlbridge._config_values.validating_as` (its source and key path), so the object checks
itself once and errors name the file and the key; an object built in code checks itself the same
way. Sources: mappings, TOML files (``mlbridge.toml`` or ``[tool.mlbridge]`` in
``pyproject.toml``) and ``MLBRIDGE_*`` variables merged over either.

Imports go one way: :mod:`mlbridge.config` imports this module and registers its three classes
(:func:`register_types`); nothing here imports :mod:`mlbridge.config`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from . import _config_errors as _errs
from ._backends import BACKENDS
from ._config_gateway import gateway_from_mapping, gateway_to_mapping
from ._config_perf import as_cache_ttl
from ._config_values import (
    BRIDGE_KEYS,
    CLASS_SUFFIX_RE,
    CODECS,
    DIRECT,
    ENV_NAME_RE,
    IMPORT_NAME_RE,
    MODULE_RE,
    TOP_KEYS,
    Ctx,
    as_bool,
    as_choice,
    as_duration,
    as_env,
    as_int,
    as_limits,
    as_settings,
    as_size,
    as_str,
    as_str_tuple,
    check_name,
    suggest,
    type_error,
    unknown_key,
    validating_as,
)
from ._host.builtins import (
    BUILTIN_BRIDGES,
    BUILTIN_OPTION_DEFAULTS,
    BUILTIN_POOL_DEFAULTS,
    builtin_available,
    is_builtin,
)
from ._isolation_values import ISOLATION_VALIDATORS
from ._scaleout_config import (
    RAY_OPTION_KEYS,
    as_environment,
    as_ray_config,
    as_ray_options,
    environment_to_mapping,
    ray_config_to_mapping,
    ray_options_to_mapping,
)
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import BridgeConfig, BridgeOptions, MLBridgeConfig

__all__ = [
    "DIRECT",
    "Ctx",
    "builtin_defaults",
    "find_config_file",
    "load",
    "read_toml",
    "register_types",
]


@dataclasses.dataclass(frozen=True, slots=True)
class _Types:
    options: type[BridgeOptions]
    bridge: type[BridgeConfig]
    config: type[MLBridgeConfig]


_types: list[_Types] = []


def register_types(
    options: type[BridgeOptions], bridge: type[BridgeConfig], config: type[MLBridgeConfig]
) -> None:
    """Called once by :mod:`mlbridge.config` (the classes the loaders build)."""
    _types[:] = [_Types(options, bridge, config)]


def _t() -> _Types:
    return _types[0]


# --------------------------------------------------------------------------- options


Validator = Callable[[Ctx, str, Any], Any]


def _dur(*, positive: bool = False, optional: bool = False) -> Validator:
    return lambda c, p, v: as_duration(c, p, v, positive=positive, optional=optional)


def _int(minimum: int, *, optional: bool = False) -> Validator:
    return lambda c, p, v: as_int(c, p, v, minimum=minimum, optional=optional)


def _size(*, optional: bool = False) -> Validator:
    return lambda c, p, v: as_size(c, p, v, optional=optional)


OPTION_VALIDATORS: Final[Mapping[str, Validator]] = MappingProxyType(
    {
        "timeout": _dur(positive=True),
        "startup_timeout": _dur(positive=True),
        "health_check_interval": _dur(),
        "heartbeat_timeout": _dur(positive=True),
        "checkout_timeout": _dur(),
        "cancel_grace": _dur(),
        "shutdown_timeout": _dur(),
        "max_requests": _int(1, optional=True),
        "max_memory": _size(optional=True),
        "max_age": _dur(positive=True, optional=True),
        "idle_timeout": _dur(),
        "lazy": as_bool,
        "max_frame_bytes": _size(),
        "codec": lambda c, p, v: as_choice(c, p, v, CODECS),
        "backend": lambda c, p, v: as_choice(c, p, v, tuple(BACKENDS)),
        "threads": _int(1, optional=True),
        "restart_backoff": _dur(),
        "max_restart_backoff": _dur(),
        "max_boot_failures": _int(1),
        "limits": as_limits,
        # OS-enforced limits and isolation (issue 16): mlbridge._isolation_values
        **ISOLATION_VALIDATORS,
        # the result cache (see mlbridge._host.result_cache)
        "cache_ttl": as_cache_ttl,
        "cache_max_entries": _int(1),
        "cache_max_bytes": _size(),
        "model_ttl": _dur(positive=True, optional=True),
        "shm_threshold_bytes": lambda c, p, v: as_size(c, p, v, minimum=0),
        "shm_pool_bytes": lambda c, p, v: as_size(c, p, v, minimum=0),
        # warm start: workers forked from a template (see mlbridge._backends.fork)
        "start": lambda c, p, v: as_choice(c, p, v, ("spawn", "fork")),
    }
)


@functools.cache
def option_defaults() -> dict[str, Any]:
    cls = _t().options
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def validate_options(ctx: Ctx, path: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key of a *complete* options mapping; returns the parsed values."""
    out: dict[str, Any] = {}
    since = _errs.mark()
    for key, raw in values.items():
        check = OPTION_VALIDATORS.get(key) if isinstance(key, str) else None
        if check is None:
            _errs.report(unknown_key(ctx, path, key, OPTION_VALIDATORS))
            continue
        try:
            out[key] = check(ctx, f"{path}.{key}", raw)
        except ConfigError as exc:
            _errs.report(exc)  # raises unless every error of the file is being collected
    _errs.checkpoint(since)
    if out["max_restart_backoff"] < out["restart_backoff"]:
        raise ctx.error(
            f"{path}.max_restart_backoff",
            f"must be >= restart_backoff ({out['restart_backoff']:g}s)",
            "raise max_restart_backoff or lower restart_backoff",
            out["max_restart_backoff"],
        )
    return out


def options_from_mapping(ctx: Ctx, path: str, data: Any) -> BridgeOptions:
    cls = _t().options
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise type_error(ctx, path, "a table", f"write [{path}] with keys such as timeout", data)
    for key in data:
        if key not in OPTION_VALIDATORS:
            _errs.report(unknown_key(ctx, path, key, OPTION_VALIDATORS))
    known = {k: v for k, v in data.items() if k in OPTION_VALIDATORS}  # check the rest too
    values = {**option_defaults(), **known}  # (built before: the defaults are an object too)
    with validating_as(ctx, path):  # BridgeOptions.__post_init__ validates (once)
        return cls(**values)


def options_to_mapping(opts: BridgeOptions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if value is not None:
            out[f.name] = (
                dict(value)
                if isinstance(value, MappingProxyType)
                else list(value)
                if f.name == "env_allowlist"
                else value
            )
    return out


# --------------------------------------------------------------------------- bridges


def _resolve_path(ctx: Ctx, text: str) -> str:
    p = Path(text).expanduser()
    if not p.is_absolute() and ctx.base_dir is not None:
        p = ctx.base_dir / p
    return os.path.normpath(p) if p.is_absolute() else str(p)


def _module(ctx: Ctx, path: str, raw: Any) -> str:
    v = as_str(ctx, path, raw, '"mypkg.bridge:MyBridge"')
    if v in BUILTIN_BRIDGES:
        return v
    if "/" in v or v.endswith(".py"):
        raise ctx.error(
            path, "looks like a file path", f'use python_script = "{v}" instead of python_module', v
        )
    if not MODULE_RE.fullmatch(v):
        raise ctx.error(
            path,
            "is not a module path",
            f'write "package.module" or "package.module:Class", or a built-in name '
            f"({', '.join(BUILTIN_BRIDGES)})",
            v,
        )
    return v


def _script(ctx: Ctx, path: str, raw: Any) -> str:
    v = as_str(ctx, path, raw, '"bridges/my_bridge.py"')
    m = CLASS_SUFFIX_RE.search(v)
    file_part, cls_part = (v[: m.start()], m.group()) if m else (v, "")
    if not file_part.endswith(".py"):
        raise ctx.error(
            path,
            "must be a path to a .py file",
            "point it at the .py file that defines your BaseBridge subclass "
            "(or use python_module for an importable module)",
            v,
        )
    return _resolve_path(ctx, file_part) + cls_part


def _python(ctx: Ctx, path: str, raw: Any) -> str:
    v = as_str(ctx, path, raw, f'"{sys.executable}"')
    return _resolve_path(ctx, v) if os.sep in v or v.startswith("~") else v


_BRIDGE_VALIDATORS: Final[Mapping[str, Validator]] = MappingProxyType(
    {
        "python_module": lambda c, p, v: None if v is None else _module(c, p, v),
        "python_script": lambda c, p, v: None if v is None else _script(c, p, v),
        "python": _python,
        "pool_size": _int(0),
        "overflow": _int(0),
        "required_env": lambda c, p, v: as_str_tuple(
            c, p, v, ENV_NAME_RE, "environment variable names", "OPENAI_API_KEY"
        ),
        "required_packages": lambda c, p, v: as_str_tuple(
            c, p, v, IMPORT_NAME_RE, "import names", "sentence_transformers"
        ),
        "options": options_from_mapping,
        "settings": as_settings,
        "env": as_env,
        "environment": as_environment,
        "ray": as_ray_options,
    }
)


class _AutoSize(int):
    """The type of :data:`AUTO_SIZE` (told apart by identity: a -1 a user writes is an error)."""


#: BridgeConfig's pool_size / overflow default: the built-in bridge's size, else 1 / 0
AUTO_SIZE: int = _AutoSize(-1)


def with_builtin_defaults(
    name: str, values: Mapping[str, Any], *, default_options: bool
) -> dict[str, Any]:
    """``values`` with :data:`AUTO_SIZE` sizes (and, when ``default_options``, the options)
    replaced by the built-in bridge's defaults, as a config file gets them."""
    out = dict(values)
    module = out.get("python_module")
    if module is None and out.get("python_script") is None:
        module = name
    sizes = BUILTIN_POOL_DEFAULTS.get(module, {}) if isinstance(module, str) else {}
    for key, fallback in (("pool_size", 1), ("overflow", 0)):
        if out.get(key) is AUTO_SIZE:
            out[key] = sizes.get(key, fallback)
    builtin_opts = BUILTIN_OPTION_DEFAULTS.get(module) if isinstance(module, str) else None
    if default_options and builtin_opts:
        out["options"] = dict(builtin_opts)  # validated as the options table
    return out


@functools.cache
def bridge_defaults() -> dict[str, Any]:
    probe = _t().bridge(name="echo")
    return {key: getattr(probe, key) for key in BRIDGE_KEYS} | {"python_module": None}


def validate_bridge(ctx: Ctx, path: str, name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check a *complete* set of bridge values (every key of BRIDGE_KEYS); returns them parsed."""
    check_name(ctx, path, name)
    out: dict[str, Any] = {}
    since = _errs.mark()
    for key in BRIDGE_KEYS:
        try:
            out[key] = _BRIDGE_VALIDATORS[key](ctx, f"{path}.{key}", values[key])
        except ConfigError as exc:
            _errs.report(exc)  # raises unless every error of the file is being collected
    _errs.checkpoint(since)
    module, script = out["python_module"], out["python_script"]
    if module is not None and script is not None:
        raise ctx.error(
            path,
            "sets both python_module and python_script",
            "keep one: python_module for an importable module or built-in name, "
            "python_script for a .py file",
            {"python_module": module, "python_script": script},
        )
    if module is None and script is None:
        if not is_builtin(name):
            raise ctx.error(
                path,
                f"{name!r} is not a built-in bridge and names no worker code",
                'add python_module = "package.module:Class" or python_script = '
                f'"path/to/bridge.py" (built-ins need neither: {", ".join(BUILTIN_BRIDGES)})',
            )
        out["python_module"] = name
    opts = out["options"]
    if out["pool_size"] == 0 and not opts.lazy:
        raise ctx.error(
            f"{path}.pool_size",
            "can be 0 only for a lazy bridge (options.lazy = true)",
            "set pool_size to 1 or more, or options.lazy = true",
            0,
        )
    if out["pool_size"] + out["overflow"] == 0:
        raise ctx.error(
            f"{path}.pool_size",
            "pool_size and overflow are both 0, so no worker could ever run",
            "set pool_size (warm workers) or overflow (on-demand workers) to 1 or more",
            0,
        )
    return out


def fold_flat_keys(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Options (``backend``, ``timeout``, ``max_memory``, ...) and Ray actor keys (``num_cpus``,
    ``num_gpus``, ``resources``, ``runtime_env``) may sit in the bridge's table itself: they go
    into its ``options`` / ``ray`` tables (where a key set there too wins)."""
    flat_opts = {
        k: v for k, v in data.items() if k not in _BRIDGE_VALIDATORS and k in OPTION_VALIDATORS
    }
    flat_ray = {
        k: v for k, v in data.items() if k not in _BRIDGE_VALIDATORS and k in RAY_OPTION_KEYS
    }
    if not flat_opts and not flat_ray:
        return data
    out = {k: v for k, v in data.items() if k not in flat_opts and k not in flat_ray}
    for key, flat in (("options", flat_opts), ("ray", flat_ray)):
        nested = out.get(key)
        if flat and (nested is None or isinstance(nested, Mapping)):
            out[key] = {**flat, **(nested or {})}
        elif flat:  # an options / ray object given as well: leave the keys to be reported
            out.update(flat)
    return out


def bridge_from_mapping(ctx: Ctx, path: str, name: str, data: Any) -> BridgeConfig:
    if not isinstance(data, Mapping):
        raise type_error(
            ctx, path, "a table", f"write [{path}] with python_module or python_script", data
        )
    data = fold_flat_keys(data)
    for key in data:
        if key not in _BRIDGE_VALIDATORS:
            _errs.report(unknown_key(ctx, path, key, BRIDGE_KEYS))
    data = {k: v for k, v in data.items() if k in _BRIDGE_VALIDATORS}  # check the rest too
    module = data.get("python_module", name if "python_script" not in data else None)
    sizes = BUILTIN_POOL_DEFAULTS.get(module, {}) if isinstance(module, str) else {}
    check_name(ctx, path, name)
    values = {**bridge_defaults(), **sizes, **data}
    builtin_opts = BUILTIN_OPTION_DEFAULTS.get(module, {}) if isinstance(module, str) else {}
    given_options = data.get("options", {})
    if builtin_opts and isinstance(given_options, Mapping):  # explicit keys still win
        values["options"] = {**builtin_opts, **given_options}
    with validating_as(ctx, path):  # BridgeConfig.__post_init__ validates (once)
        return _t().bridge(name=name, **values)


def bridge_to_mapping(cfg: BridgeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.python_script is not None:
        out["python_script"] = cfg.python_script
    else:
        out["python_module"] = cfg.python_module
    out.update(
        python=cfg.python,
        pool_size=cfg.pool_size,
        overflow=cfg.overflow,
        required_env=list(cfg.required_env),
        required_packages=list(cfg.required_packages),
        options=options_to_mapping(cfg.options),
        settings=json.loads(json.dumps(dict(cfg.settings))),
        env=dict(cfg.env),
    )
    if cfg.environment is not None:
        out["environment"] = environment_to_mapping(cfg.environment)
    if cfg.ray is not None:
        out["ray"] = ray_options_to_mapping(cfg.ray)
    return out


def apply_changes(
    ctx: Ctx, path: str, raw: dict[str, Any], changes: Mapping[str, Any]
) -> dict[str, Any]:
    """Fold keyword changes (bridge keys, or option names) into a raw bridge mapping."""
    out = dict(raw)
    options = dict(out.get("options") or {})
    for key, value in changes.items():
        if key == "options":
            if isinstance(value, Mapping):
                options.update(value)
            elif value is not None:
                if not isinstance(value, _t().options):
                    raise type_error(
                        ctx, f"{path}.options", "a mapping or BridgeOptions", "pass a dict", value
                    )
                options.update(options_to_mapping(value))
        elif key in BRIDGE_KEYS:
            out[key] = value
        elif key in OPTION_VALIDATORS:
            options[key] = value
        elif key in RAY_OPTION_KEYS:  # per-actor Ray resources: the bridge's `ray` table
            ray = out.get("ray")
            if ray is None or isinstance(ray, Mapping):
                out["ray"] = {**(ray or {}), key: value}
            else:
                out["ray"] = {**ray_options_to_mapping(ray), key: value}
        else:
            raise unknown_key(ctx, path, key, [*BRIDGE_KEYS, *OPTION_VALIDATORS, *RAY_OPTION_KEYS])
    # Choosing one kind of worker code replaces the other.
    if changes.get("python_script") is not None and "python_module" not in changes:
        out.pop("python_module", None)
    if changes.get("python_module") is not None and "python_script" not in changes:
        out.pop("python_script", None)
    out["options"] = {k: v for k, v in options.items() if v is not None}
    return {k: v for k, v in out.items() if v is not None}


# --------------------------------------------------------------------------- whole config


def check_default(ctx: Ctx, names: list[str], default: Any) -> str | None:
    if default is None:
        return names[0] if names else None
    as_str(ctx, "default_bridge", default, '"echo"')
    if default not in names:
        fix = (
            f"{suggest(default, names)}Set default_bridge to one of: {', '.join(names)}"
            if names
            else f"Add a [bridges.{default}] table, or remove default_bridge"
        )
        raise ctx.error("default_bridge", "names a bridge that is not configured", fix, default)
    return str(default)


def config_from_mapping(ctx: Ctx, data: Any) -> MLBridgeConfig:
    """The config in ``data``; every error in it is reported at once (one ConfigError listing
    them all, see :mod:`._config_errors`)."""
    with _errs.collecting(ctx.source):
        return _config_from_mapping(ctx, data)


def _config_from_mapping(ctx: Ctx, data: Any) -> MLBridgeConfig:
    if not isinstance(data, Mapping):
        raise type_error(
            ctx, "(top level)", "a table", "write default_bridge and [bridges.*]", data
        )
    for key in data:
        if key not in TOP_KEYS:
            _errs.report(unknown_key(ctx, "", key, TOP_KEYS))
    raw_bridges = data.get("bridges", {})
    if not isinstance(raw_bridges, Mapping):
        raise type_error(
            ctx, "bridges", "a table of bridges", "write [bridges.<name>] tables", raw_bridges
        )
    bridges: dict[str, BridgeConfig] = {}
    failed: set[str] = set()
    for name, body in raw_bridges.items():
        try:  # one bad bridge does not hide the errors of the next
            check_name(ctx, f"bridges.{name}", name)
            bridges[name] = bridge_from_mapping(ctx, f"bridges.{name}", name, body)
        except ConfigError as exc:
            failed.add(name)
            if not isinstance(exc, _errs.UnitAbortedError):
                _errs.report(exc)
    gateway = None
    if "gateway" in data:  # [gateway] (mlbridge serve)
        try:
            gateway = gateway_from_mapping(ctx, "gateway", data["gateway"])
        except ConfigError as exc:
            _errs.report(exc)
    if failed or _errs.mark():
        # The errors so far are the story; a default naming a bridge that failed is not news.
        default = data.get("default_bridge")
        if default is not None and default not in failed:
            try:
                check_default(ctx, [*bridges, *failed], default)
            except ConfigError as exc:
                _errs.report(exc)
        _errs.checkpoint(0)
    with validating_as(ctx, ""):  # MLBridgeConfig.__post_init__ checks the default (once)
        config = _t().config(
            bridges=MappingProxyType(bridges),
            default_bridge=data.get("default_bridge"),
            ray=as_ray_config(ctx, "ray", data.get("ray")),
        )
    if gateway is not None:
        config = dataclasses.replace(config, gateway=gateway)
    return config


def config_to_mapping(cfg: MLBridgeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.default_bridge is not None:
        out["default_bridge"] = cfg.default_bridge
    out["bridges"] = {name: bridge_to_mapping(b) for name, b in cfg.bridges.items()}
    if ray_config_to_mapping(cfg.ray):
        out["ray"] = ray_config_to_mapping(cfg.ray)
    gateway = gateway_to_mapping(cfg.gateway)
    if gateway:
        out["gateway"] = gateway
    return out


def builtin_defaults() -> MLBridgeConfig:
    types = _t()
    names = [n for n in BUILTIN_BRIDGES if n == "echo" or builtin_available(n)]
    bridges = {}
    for n in names:
        sizes = BUILTIN_POOL_DEFAULTS.get(n, {})
        builtin_opts: dict[str, Any] = dict(BUILTIN_OPTION_DEFAULTS.get(n, {}))
        bridges[n] = types.bridge(
            name=n,
            python_module=n,
            pool_size=sizes.get("pool_size", 1),
            overflow=sizes.get("overflow", 0),
            options=types.options(**builtin_opts),
        )
    return types.config(bridges=MappingProxyType(bridges), default_bridge="echo")


# --------------------------------------------------------------------------- files


def read_toml(path: str | os.PathLike[str]) -> MLBridgeConfig:
    p = Path(path).expanduser()
    source = str(p)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(
            f"{source}: config file {what}. Fix: pass the path of an mlbridge.toml or "
            "pyproject.toml, or create one",
            source=source,
            fix="pass an existing file",
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{source}: cannot read the config file: {exc}. Fix: check its permissions and "
            "that it is UTF-8 text",
            source=source,
            fix="make the file readable",
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{source}: invalid TOML: {exc}. Fix: correct the syntax there (see https://toml.io)",
            source=source,
            fix="correct the TOML syntax",
        ) from exc
    ctx = Ctx(source=source, base_dir=p.resolve().parent)
    if p.name == "pyproject.toml":
        tool = data.get("tool")
        section = tool.get("mlbridge") if isinstance(tool, dict) else None
        if section is None:
            raise ConfigError(
                f"{source}: no [tool.mlbridge] table. Fix: add [tool.mlbridge] (with "
                "[tool.mlbridge.bridges.<name>] tables), or use an mlbridge.toml",
                source=source,
                fix="add a [tool.mlbridge] table",
            )
        return config_from_mapping(dataclasses.replace(ctx, prefix="tool.mlbridge."), section)
    return config_from_mapping(ctx, data)


def _has_tool_section(pyproject: Path) -> bool:
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if "mlbridge" not in text:  # cheap: a broken, unrelated pyproject.toml is not ours to judge
        return False
    try:
        return "mlbridge" in tomllib.loads(text).get("tool", {})
    except tomllib.TOMLDecodeError:
        return True  # it mentions mlbridge: load it and report the syntax error


def find_config_file(start_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The nearest mlbridge.toml, or pyproject.toml with [tool.mlbridge], from start_dir up."""
    here = Path(start_dir if start_dir is not None else os.getcwd()).expanduser().resolve()
    for folder in (here, *here.parents):
        candidate = folder / "mlbridge.toml"
        if candidate.is_file():
            return candidate
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and _has_tool_section(pyproject):
            return pyproject
    return None


# --------------------------------------------------------------------------- environment

ENV_PREFIX: Final = "MLBRIDGE_"
# MLBRIDGE_* names that are not configuration keys (set for workers, or read elsewhere).
_ENV_IGNORED_TOPS: Final = ("config", "worker")
_STRING_KEYS: Final = ("python", "python_module", "python_script")


def _env_value(path: list[str], raw: str) -> Any:
    if path[0] == "default_bridge" or (
        (len(path) == 3 and path[2] in _STRING_KEYS) or (len(path) == 4 and path[2] == "env")
    ):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _match_key(existing: Mapping[str, Any], part: str, keep_case: bool) -> str:
    for key in existing:
        if isinstance(key, str) and key.lower() == part.lower():
            return key
    return part if keep_case else part.lower()


def env_overlay(
    environ: Mapping[str, str], base: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``MLBRIDGE_*`` variables as a nested mapping (merged over ``base``) and their origins."""
    ctx = Ctx(source="environment")
    entries: list[tuple[list[str], str, str]] = []
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        parts = var[len(ENV_PREFIX) :].split("__")
        top = parts[0].lower()
        if top not in TOP_KEYS:
            if top.startswith(_ENV_IGNORED_TOPS) or not suggest(top, TOP_KEYS):
                continue
            raise ctx.error(
                var,
                f"unknown configuration variable (key {top!r})",
                f"{suggest(top, TOP_KEYS)}Config variables are MLBRIDGE_DEFAULT_BRIDGE and "
                "MLBRIDGE_BRIDGES__<NAME>__<KEY>",
            )
        if any(not p for p in parts):
            raise ctx.error(
                var,
                "has an empty key",
                "separate keys with exactly two underscores: MLBRIDGE_BRIDGES__ECHO__POOL_SIZE",
            )
        if top == "default_bridge" and len(parts) > 1:
            raise ctx.error(
                var, "default_bridge is not a table", "set MLBRIDGE_DEFAULT_BRIDGE=<name>"
            )
        entries.append((parts, var, raw))

    merged: dict[str, Any] = _deep_copy(base)
    origins: dict[str, str] = {}
    for parts, var, raw in sorted(entries, key=lambda e: len(e[0])):
        node: dict[str, Any] = merged
        path: list[str] = []
        for depth, part in enumerate(parts):
            keep_case = len(path) >= 3 and path[2] == "env"
            key = _match_key(node, part, keep_case)
            path.append(key)
            if depth == len(parts) - 1:
                value = _env_value(path, raw)
                if isinstance(value, Mapping) and isinstance(node.get(key), Mapping):
                    node[key] = _deep_merge(node[key], value)
                else:
                    node[key] = value
                if len(path) == 3 and key in ("python_module", "python_script"):
                    other = "python_script" if key == "python_module" else "python_module"
                    node.pop(other, None)
            else:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = {} if not isinstance(child, Mapping) else dict(child)
                    node[key] = child
                node = child
        origins[".".join(path)] = var
    return merged, origins


def _deep_copy(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in m.items()}


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = _deep_copy(a)
    for k, v in b.items():
        out[k] = (
            _deep_merge(out[k], v)
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
            else v
        )
    return out


def from_env(environ: Mapping[str, str] | None, base: MLBridgeConfig | None) -> MLBridgeConfig:
    env = os.environ if environ is None else environ
    raw_base = config_to_mapping(base) if base is not None else {}
    merged, origins = env_overlay(env, raw_base)
    if not origins:
        return base if base is not None else _t().config()
    return config_from_mapping(Ctx(source="environment", origins=origins), merged)


def load(
    path: str | os.PathLike[str] | None,
    start_dir: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None,
) -> MLBridgeConfig:
    env = os.environ if environ is None else environ
    explicit = path if path is not None else env.get("MLBRIDGE_CONFIG") or None
    if explicit is not None:
        base = read_toml(explicit)
    else:
        found = find_config_file(start_dir)
        base = read_toml(found) if found is not None else builtin_defaults()
    return from_env(env, base)
