"""Value checks for the performance options: the result cache's ``cache_ttl``, ``model_ttl``.

``cache_ttl`` is either one duration, for every command the bridge declares cacheable, or a
table ``command -> duration``; in a table the key ``"*"`` stands for every declared command and
a named command is cached even when its bridge does not declare it (the config's author vouches
that its result depends only on its arguments). A duration of 0 turns caching off for that
entry. The parsed value is a read-only mapping (a lone duration ``d`` becomes ``{"*": d}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from ._config_values import Ctx, as_duration, type_error

__all__ = ["ALL_COMMANDS", "CACHE_TTL_HELP", "as_cache_ttl", "with_model_ttl"]

ALL_COMMANDS: Final = "*"
CACHE_TTL_HELP: Final = (
    'write a duration such as "10m" (every command the bridge declares cacheable), or a table '
    'such as {embed = "10m", tokenize = "1h"} (one per command; "*" for every declared command; '
    "0 turns an entry off), or leave it out to turn the result cache off"
)


def as_cache_ttl(ctx: Ctx, path: str, v: Any) -> MappingProxyType[str, float] | None:
    if v is None:
        return None
    if isinstance(v, Mapping):
        out: dict[str, float] = {}
        for key, val in v.items():
            if not isinstance(key, str) or not key or ":" in key:
                raise ctx.error(
                    path,
                    f"has the key {key!r}, which is not a command name",
                    'name commands without their namespace ("embed", not "transformers:embed")',
                    v,
                )
            out[key] = as_duration(ctx, f"{path}.{key}", val) or 0.0
        return MappingProxyType(out)
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise type_error(ctx, path, "a duration or a table of durations", CACHE_TTL_HELP, v)
    return MappingProxyType({ALL_COMMANDS: as_duration(ctx, path, v) or 0.0})


def with_model_ttl(settings: Mapping[str, Any], model_ttl: float | None) -> Mapping[str, Any]:
    """A worker's settings with the ``model_ttl`` option in them (settings that name one win)."""
    if model_ttl is None or "model_ttl" in settings:
        return settings
    return MappingProxyType({**settings, "model_ttl": model_ttl})
