"""Parsing and validation behind :mod:`mlbridge.config`.

One validator per key, shared by the loaders (which know the key path and the source, so errors
name both) and by the dataclasses' ``__post_init__`` (the safety net for objects built in code).
Sources: mappings, TOML files (``mlbridge.toml`` or ``[tool.mlbridge]`` in ``pyproject.toml``)
and ``MLBRIDGE_*`` variables merged over either. Every failure is a :class:`ConfigError` whose
message reads ``<source>: <key.path>: <problem> (got <value>). Fix: <what to do>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from ._host.builtins import BUILTIN_BRIDGES, builtin_available, is_builtin
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import BridgeConfig, BridgeOptions, MLBridgeConfig

__all__ = [
    "Ctx",
    "parse_duration",
    "parse_size",
]

_MISSING: Final = object()
TOP_KEYS: Final = ("default_bridge", "bridges")
BRIDGE_KEYS: Final = (
    "python_module",
    "python_script",
    "python",
    "pool_size",
    "overflow",
    "required_env",
    "required_packages",
    "options",
    "settings",
    "env",
)
LIMIT_KEYS: Final = ("address_space_bytes", "cpu_seconds", "open_files")
CODECS: Final = ("msgpack", "json")
RESERVED_NAMES: Final = ("common",)  # "common:ping" is the shared command namespace

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_MODULE_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_]\w*)?")
_IMPORT_NAME_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CLASS_SUFFIX_RE = re.compile(r":[A-Za-z_]\w*$")

DURATION_HELP: Final = (
    'use seconds as a number (30, 0.25) or a string with a unit: "250ms", "30s", "5m", "1h"'
)
SIZE_HELP: Final = 'use bytes as an integer or a string with a unit: "512MB", "2GiB", "64KiB"'


# --------------------------------------------------------------------------- errors


@dataclasses.dataclass(frozen=True, slots=True)
class Ctx:
    """Where values come from, so an error can say so."""

    source: str | None = None  # a file path, "environment", "<mapping>"; None: built in code
    prefix: str = ""  # "tool.mlbridge." inside pyproject.toml
    base_dir: Path | None = None  # relative python_script / python resolve against this
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict)  # path -> variable

    def error(self, path: str, problem: str, fix: str, value: object = _MISSING) -> ConfigError:
        where = f"{self.source}: " if self.source else ""
        got = "" if value is _MISSING else f" (got {value!r})"
        origin = self._origin(path)
        via = f" [set by {origin}]" if origin else ""
        fix = fix[:1].upper() + fix[1:]
        return ConfigError(
            f"{where}{self.prefix}{path}: {problem}{got}{via}. Fix: {fix}",
            key_path=self.prefix + path,
            value=None if value is _MISSING else value,
            fix=fix,
            source=self.source,
        )

    def _origin(self, path: str) -> str | None:
        if not self.origins:
            return None
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            var = self.origins.get(".".join(parts[:i]))
            if var is not None:
                return var
        below = sorted(v for k, v in self.origins.items() if k.startswith(path + "."))
        return ", ".join(below) or None


DIRECT: Final = Ctx()


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"Did you mean {close[0]!r}? " if close else ""


def unknown_key(ctx: Ctx, path: str, key: object, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    where = f"{path}.{key}" if path else str(key)
    hint = suggest(key, valid) if isinstance(key, str) else ""
    return ctx.error(where, f"unknown key {key!r}", f"{hint}Valid keys here: {', '.join(valid)}")


def _type_error(ctx: Ctx, path: str, want: str, fix: str, value: object) -> ConfigError:
    return ctx.error(path, f"must be {want}, not {type(value).__name__}", fix, value)


# --------------------------------------------------------------------------- scalars


_DURATION_UNITS: Final = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(us|ms|min|s|m|h|d)")
_DURATION_FULL = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)\s*(?:us|ms|min|s|m|h|d)\s*)+")
_NUMBER_FULL = re.compile(r"\d+(?:\.\d+)?|\.\d+")


def parse_duration(text: str) -> float | None:
    """``"250ms"`` -> 0.25, ``"1m30s"`` -> 90.0, ``"2"`` -> 2.0; None when not a duration."""
    s = text.strip().lower()
    if _NUMBER_FULL.fullmatch(s):
        return float(s)
    if not _DURATION_FULL.fullmatch(s):
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(s))


_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]?)(i?)(b?)", re.IGNORECASE)
_SIZE_POWERS: Final = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str) -> int | None:
    """``"512MB"`` -> 512_000_000, ``"2GiB"`` -> 2 * 1024**3, ``"100"`` -> 100; None if invalid."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        return None
    number, prefix, binary, _ = m.groups()
    if binary and not prefix:
        return None
    base = 1024 if binary else 1000
    scale: int = base ** _SIZE_POWERS[prefix.lower()]
    return round(float(number) * scale)


def as_duration(
    ctx: Ctx, path: str, v: Any, *, positive: bool = False, optional: bool = False
) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, str):
        if v.strip().startswith("-"):
            raise ctx.error(path, "must not be negative", DURATION_HELP, v)
        parsed = parse_duration(v)
        if parsed is None:
            raise ctx.error(path, "is not a duration", DURATION_HELP, v)
        v = parsed
    elif isinstance(v, bool) or not isinstance(v, int | float):
        opt = " (or leave it out)" if optional else ""
        raise _type_error(ctx, path, "a duration", DURATION_HELP + opt, v)
    seconds = float(v)
    if not math.isfinite(seconds):
        raise ctx.error(path, "must be a finite duration", DURATION_HELP, seconds)
    if seconds < 0 or (positive and seconds == 0):
        want = "greater than 0" if positive else "0 or more"
        raise ctx.error(path, f"must be {want} seconds", DURATION_HELP, seconds)
    return seconds


def as_size(ctx: Ctx, path: str, v: Any, *, minimum: int = 1, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    opt = " (or leave it out for no limit)" if optional else ""
    if isinstance(v, str):
        if v.strip().startswith("-"):
            raise ctx.error(path, "must not be negative", SIZE_HELP + opt, v)
        parsed = parse_size(v)
        if parsed is None:
            raise ctx.error(path, "is not a size", SIZE_HELP + opt, v)
        v = parsed
    elif isinstance(v, float) and v.is_integer():
        v = int(v)
    elif isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(ctx, path, "a size in bytes", SIZE_HELP + opt, v)
    if v < minimum:
        raise ctx.error(path, f"must be at least {minimum} bytes", SIZE_HELP + opt, v)
    return int(v)


def as_int(ctx: Ctx, path: str, v: Any, *, minimum: int, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    opt = " (or leave it out)" if optional else ""
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(
            ctx, path, "an integer", f"write a whole number such as {max(minimum, 1)}{opt}", v
        )
    if v < minimum:
        raise ctx.error(path, f"must be >= {minimum}", f"set it to {minimum} or more{opt}", v)
    return v


def as_bool(ctx: Ctx, path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _type_error(ctx, path, "true or false", "write true or false (no quotes)", v)
    return v


def as_str(ctx: Ctx, path: str, v: Any, example: str) -> str:
    if not isinstance(v, str) or not v.strip():
        if isinstance(v, str):
            raise ctx.error(path, "must not be empty", f"write a value such as {example}", v)
        raise _type_error(ctx, path, "a string", f"write a quoted string such as {example}", v)
    return v


def as_choice(ctx: Ctx, path: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        names = " or ".join(repr(c) for c in choices)
        raise ctx.error(path, f"must be {names}", f"{suggest(str(v), choices)}Use {names}", v)
    return str(v)


def as_str_tuple(
    ctx: Ctx, path: str, v: Any, pattern: re.Pattern[str], what: str, example: str
) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, list | tuple):
        raise _type_error(ctx, path, f"a list of {what}", f'write a list such as ["{example}"]', v)
    for i, item in enumerate(v):
        if not isinstance(item, str) or not pattern.fullmatch(item):
            fix = f'write {what} such as "{example}"'
            if isinstance(item, str) and "-" in item and pattern is _IMPORT_NAME_RE:
                fix = f"use the import name, not the distribution name: {item.replace('-', '_')!r}"
            raise ctx.error(f"{path}[{i}]", f"is not a valid {what[:-1]}", fix, item)
    return tuple(v)


def as_env(ctx: Ctx, path: str, v: Any) -> MappingProxyType[str, str]:
    if not isinstance(v, Mapping):
        raise _type_error(ctx, path, "a table of strings", 'write {NAME = "value"}', v)
    for key, val in v.items():
        if not isinstance(key, str) or not _ENV_NAME_RE.fullmatch(key):
            raise ctx.error(
                f"{path}.{key}", "is not a valid environment variable name", "use A-Z, 0-9, _", key
            )
        if not isinstance(val, str):
            raise _type_error(ctx, f"{path}.{key}", "a string", f'quote it: "{val}"', val)
    return MappingProxyType(dict(v))


def _json_value(ctx: Ctx, path: str, v: Any) -> Any:
    """A copy of ``v`` made of JSON types (settings travel to the worker as JSON)."""
    if v is None or isinstance(v, str | bool | int | float):
        return v
    if isinstance(v, Mapping):
        out: dict[str, Any] = {}
        for key, val in v.items():
            if not isinstance(key, str):
                raise _type_error(ctx, f"{path}.{key}", "a string key", "use string keys", key)
            out[key] = _json_value(ctx, f"{path}.{key}", val)
        return out
    if isinstance(v, list | tuple):
        return [_json_value(ctx, f"{path}[{i}]", item) for i, item in enumerate(v)]
    raise _type_error(
        ctx, path, "a JSON value (string, number, bool, list, table)", "quote it as a string", v
    )


def as_settings(ctx: Ctx, path: str, v: Any) -> MappingProxyType[str, Any]:
    if not isinstance(v, Mapping):
        raise _type_error(ctx, path, "a table", "write settings as a table of values", v)
    return MappingProxyType(_json_value(ctx, path, v))


def as_limits(ctx: Ctx, path: str, v: Any) -> MappingProxyType[str, int]:
    if not isinstance(v, Mapping):
        raise _type_error(ctx, path, "a table", 'write {address_space_bytes = "4GiB"}', v)
    out: dict[str, int] = {}
    for key, val in v.items():
        p = f"{path}.{key}"
        if key == "address_space_bytes":
            out[key] = as_size(ctx, p, val) or 0
        elif key == "cpu_seconds":
            out[key] = math.ceil(as_duration(ctx, p, val, positive=True) or 0)
        elif key == "open_files":
            out[key] = as_int(ctx, p, val, minimum=1) or 0
        else:
            raise unknown_key(ctx, path, key, LIMIT_KEYS)
    return MappingProxyType(out)


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
        "threads": _int(1, optional=True),
        "restart_backoff": _dur(),
        "max_restart_backoff": _dur(),
        "max_boot_failures": _int(1),
        "limits": as_limits,
    }
)


def option_defaults() -> dict[str, Any]:
    from .config import BridgeOptions

    return {f.name: getattr(BridgeOptions(), f.name) for f in dataclasses.fields(BridgeOptions)}


def validate_options(ctx: Ctx, path: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key of a *complete* options mapping; returns the parsed values."""
    out: dict[str, Any] = {}
    for key, raw in values.items():
        check = OPTION_VALIDATORS.get(key) if isinstance(key, str) else None
        if check is None:
            raise unknown_key(ctx, path, key, OPTION_VALIDATORS)
        out[key] = check(ctx, f"{path}.{key}", raw)
    if out["max_restart_backoff"] < out["restart_backoff"]:
        raise ctx.error(
            f"{path}.max_restart_backoff",
            f"must be >= restart_backoff ({out['restart_backoff']:g}s)",
            "raise max_restart_backoff or lower restart_backoff",
            out["max_restart_backoff"],
        )
    return out


def options_from_mapping(ctx: Ctx, path: str, data: Any) -> BridgeOptions:
    from .config import BridgeOptions

    if isinstance(data, BridgeOptions):
        return data
    if not isinstance(data, Mapping):
        raise _type_error(ctx, path, "a table", f"write [{path}] with keys such as timeout", data)
    for key in data:
        if key not in OPTION_VALIDATORS:
            raise unknown_key(ctx, path, key, OPTION_VALIDATORS)
    return BridgeOptions(**validate_options(ctx, path, {**option_defaults(), **data}))


def options_to_mapping(opts: BridgeOptions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if value is not None:
            out[f.name] = dict(value) if f.name == "limits" else value
    return out


# --------------------------------------------------------------------------- bridges


def check_name(ctx: Ctx, path: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ctx.error(
            path,
            "is not a valid bridge name",
            "use letters, digits, '_' or '-', starting with a letter or digit",
            name,
        )
    if name in RESERVED_NAMES:
        raise ctx.error(
            path, f"{name!r} is reserved for shared commands", "pick another name", name
        )
    return name


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
    if not _MODULE_RE.fullmatch(v):
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
    m = _CLASS_SUFFIX_RE.search(v)
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
            c, p, v, _ENV_NAME_RE, "environment variable names", "OPENAI_API_KEY"
        ),
        "required_packages": lambda c, p, v: as_str_tuple(
            c, p, v, _IMPORT_NAME_RE, "import names", "sentence_transformers"
        ),
        "options": options_from_mapping,
        "settings": as_settings,
        "env": as_env,
    }
)


def bridge_defaults() -> dict[str, Any]:
    from .config import BridgeConfig

    probe = BridgeConfig(name="echo")
    return {key: getattr(probe, key) for key in BRIDGE_KEYS} | {"python_module": None}


def validate_bridge(ctx: Ctx, path: str, name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check a *complete* set of bridge values (every key of BRIDGE_KEYS); returns them parsed."""
    check_name(ctx, path, name)
    out = {key: _BRIDGE_VALIDATORS[key](ctx, f"{path}.{key}", values[key]) for key in BRIDGE_KEYS}
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


def bridge_from_mapping(ctx: Ctx, path: str, name: str, data: Any) -> BridgeConfig:
    from .config import BridgeConfig

    if not isinstance(data, Mapping):
        raise _type_error(
            ctx, path, "a table", f"write [{path}] with python_module or python_script", data
        )
    for key in data:
        if key not in _BRIDGE_VALIDATORS:
            raise unknown_key(ctx, path, key, BRIDGE_KEYS)
    values = validate_bridge(ctx, path, name, {**bridge_defaults(), **data})
    return BridgeConfig(name=name, **values)


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
                from .config import BridgeOptions

                if not isinstance(value, BridgeOptions):
                    raise _type_error(
                        ctx, f"{path}.options", "a mapping or BridgeOptions", "pass a dict", value
                    )
                options.update(options_to_mapping(value))
        elif key in BRIDGE_KEYS:
            out[key] = value
        elif key in OPTION_VALIDATORS:
            options[key] = value
        else:
            raise unknown_key(ctx, path, key, [*BRIDGE_KEYS, *OPTION_VALIDATORS])
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
            f"{suggest(default, names)}set default_bridge to one of: {', '.join(names)}"
            if names
            else f"add a [bridges.{default}] table, or remove default_bridge"
        )
        raise ctx.error("default_bridge", "names a bridge that is not configured", fix, default)
    return str(default)


def config_from_mapping(ctx: Ctx, data: Any) -> MLBridgeConfig:
    from .config import MLBridgeConfig

    if not isinstance(data, Mapping):
        raise _type_error(
            ctx, "(top level)", "a table", "write default_bridge and [bridges.*]", data
        )
    for key in data:
        if key not in TOP_KEYS:
            raise unknown_key(ctx, "", key, TOP_KEYS)
    raw_bridges = data.get("bridges", {})
    if not isinstance(raw_bridges, Mapping):
        raise _type_error(
            ctx, "bridges", "a table of bridges", "write [bridges.<name>] tables", raw_bridges
        )
    bridges: dict[str, BridgeConfig] = {}
    for name, body in raw_bridges.items():
        check_name(ctx, f"bridges.{name}", name)
        bridges[name] = bridge_from_mapping(ctx, f"bridges.{name}", name, body)
    default = check_default(ctx, list(bridges), data.get("default_bridge"))
    return MLBridgeConfig(bridges=MappingProxyType(bridges), default_bridge=default)


def config_to_mapping(cfg: MLBridgeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.default_bridge is not None:
        out["default_bridge"] = cfg.default_bridge
    out["bridges"] = {name: bridge_to_mapping(b) for name, b in cfg.bridges.items()}
    return out


def builtin_defaults() -> MLBridgeConfig:
    from .config import BridgeConfig, MLBridgeConfig

    names = [n for n in BUILTIN_BRIDGES if n == "echo" or builtin_available(n)]
    bridges = {n: BridgeConfig(name=n, python_module=n) for n in names}
    return MLBridgeConfig(bridges=MappingProxyType(bridges), default_bridge="echo")


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
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{source}: invalid TOML: {exc}. Fix: correct the syntax there (see https://toml.io)",
            source=source,
            fix="correct the TOML syntax",
        ) from exc
    ctx = Ctx(source=source, base_dir=p.resolve().parent)
    if p.name == "pyproject.toml":
        section = data.get("tool", {}).get("mlbridge")
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
    from .config import MLBridgeConfig

    env = os.environ if environ is None else environ
    raw_base = config_to_mapping(base) if base is not None else {}
    merged, origins = env_overlay(env, raw_base)
    if not origins:
        return base if base is not None else MLBridgeConfig()
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
