"""Value checks for configuration: one function per kind of value, each naming its key path.

Shared by the loaders in :mod:`mlbridge._config_load` (which know the source and the full key
path) and by the config dataclasses' ``__post_init__``. A failure is a :class:`ConfigError` whose
message reads ``<source>: <key.path>: <problem> (got <value>). Fix: <what to do>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from .errors import ConfigError

MISSING: Final = object()
TOP_KEYS: Final = ("default_bridge", "bridges", "gateway")
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

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MODULE_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_]\w*)?")
IMPORT_NAME_RE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CLASS_SUFFIX_RE = re.compile(r":[A-Za-z_]\w*$")

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

    def error(self, path: str, problem: str, fix: str, value: object = MISSING) -> ConfigError:
        where = f"{self.source}: " if self.source else ""
        got = "" if value is MISSING else f" (got {value!r})"
        origin = self._origin(path)
        via = f" [set by {origin}]" if origin else ""
        fix = fix[:1].upper() + fix[1:]
        return ConfigError(
            f"{where}{self.prefix}{path}: {problem}{got}{via}. Fix: {fix}",
            key_path=self.prefix + path,
            value=None if value is MISSING else value,
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

# The source and key path the config object being built right now is validated under: a loader
# sets it (it knows the file and the key path), so each object validates once, in its
# __post_init__, and errors still name the source. Objects built in code use DIRECT.
_VALIDATING: ContextVar[tuple[Ctx, str] | None] = ContextVar("mlbridge_config", default=None)


@contextlib.contextmanager
def validating_as(ctx: Ctx, path: str) -> Iterator[None]:
    token = _VALIDATING.set((ctx, path))
    try:
        yield
    finally:
        _VALIDATING.reset(token)


def validation_context(default_path: str) -> tuple[Ctx, str]:
    """For a __post_init__: the loader's (ctx, path), taken once, else (DIRECT, default_path)."""
    got = _VALIDATING.get()
    if got is None:
        return DIRECT, default_path
    _VALIDATING.set(None)  # objects the validators build get their own context
    return got


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"Did you mean {close[0]!r}? " if close else ""


def unknown_key(ctx: Ctx, path: str, key: object, valid: Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    where = f"{path}.{key}" if path else str(key)
    hint = suggest(key, valid) if isinstance(key, str) else ""
    return ctx.error(where, f"unknown key {key!r}", f"{hint}Valid keys here: {', '.join(valid)}")


def type_error(ctx: Ctx, path: str, want: str, fix: str, value: object) -> ConfigError:
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
        raise type_error(ctx, path, "a duration", DURATION_HELP + opt, v)
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
        raise type_error(ctx, path, "a size in bytes", SIZE_HELP + opt, v)
    if v < minimum:
        raise ctx.error(path, f"must be at least {minimum} bytes", SIZE_HELP + opt, v)
    return int(v)


def as_int(ctx: Ctx, path: str, v: Any, *, minimum: int, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    opt = " (or leave it out)" if optional else ""
    if isinstance(v, bool) or not isinstance(v, int):
        raise type_error(
            ctx, path, "an integer", f"write a whole number such as {max(minimum, 1)}{opt}", v
        )
    if v < minimum:
        raise ctx.error(path, f"must be >= {minimum}", f"set it to {minimum} or more{opt}", v)
    return v


def as_bool(ctx: Ctx, path: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise type_error(ctx, path, "true or false", "write true or false (no quotes)", v)
    return v


def as_str(ctx: Ctx, path: str, v: Any, example: str) -> str:
    if not isinstance(v, str) or not v.strip():
        if isinstance(v, str):
            raise ctx.error(path, "must not be empty", f"write a value such as {example}", v)
        raise type_error(ctx, path, "a string", f"write a quoted string such as {example}", v)
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
        raise type_error(ctx, path, f"a list of {what}", f'write a list such as ["{example}"]', v)
    for i, item in enumerate(v):
        if not isinstance(item, str) or not pattern.fullmatch(item):
            fix = f'write {what} such as "{example}"'
            if isinstance(item, str) and "-" in item and pattern is IMPORT_NAME_RE:
                fix = f"use the import name, not the distribution name: {item.replace('-', '_')!r}"
            raise ctx.error(f"{path}[{i}]", f"is not a valid {what[:-1]}", fix, item)
    return tuple(v)


def as_env(ctx: Ctx, path: str, v: Any) -> MappingProxyType[str, str]:
    if not isinstance(v, Mapping):
        raise type_error(ctx, path, "a table of strings", 'write {NAME = "value"}', v)
    for key, val in v.items():
        if not isinstance(key, str) or not ENV_NAME_RE.fullmatch(key):
            raise ctx.error(
                f"{path}.{key}", "is not a valid environment variable name", "use A-Z, 0-9, _", key
            )
        if not isinstance(val, str):
            raise type_error(ctx, f"{path}.{key}", "a string", f'quote it: "{val}"', val)
    return MappingProxyType(dict(v))


def _json_value(ctx: Ctx, path: str, v: Any) -> Any:
    """A copy of ``v`` made of JSON types (settings travel to the worker as JSON)."""
    if v is None or isinstance(v, str | bool | int | float):
        return v
    if isinstance(v, Mapping):
        out: dict[str, Any] = {}
        for key, val in v.items():
            if not isinstance(key, str):
                raise type_error(ctx, f"{path}.{key}", "a string key", "use string keys", key)
            out[key] = _json_value(ctx, f"{path}.{key}", val)
        return out
    if isinstance(v, list | tuple):
        return [_json_value(ctx, f"{path}[{i}]", item) for i, item in enumerate(v)]
    raise type_error(
        ctx, path, "a JSON value (string, number, bool, list, table)", "quote it as a string", v
    )


def as_settings(ctx: Ctx, path: str, v: Any) -> MappingProxyType[str, Any]:
    if not isinstance(v, Mapping):
        raise type_error(ctx, path, "a table", "write settings as a table of values", v)
    return MappingProxyType(_json_value(ctx, path, v))


def as_limits(ctx: Ctx, path: str, v: Any) -> MappingProxyType[str, int]:
    if not isinstance(v, Mapping):
        raise type_error(ctx, path, "a table", 'write {address_space_bytes = "4GiB"}', v)
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


def check_name(ctx: Ctx, path: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
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
