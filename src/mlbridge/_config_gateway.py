"""The ``[gateway]`` section of ``mlbridge.toml``: how ``mlbridge serve`` listens and guards.

::

    [gateway]
    host = "127.0.0.1"          # a non-loopback address needs a token
    port = 8765                 # 0: any free port (the URL is printed and written down)
    token = "..."               # or MLBRIDGE_TOKEN; required on every route but /healthz, /readyz
    max_body_bytes = "16MiB"    # larger request bodies get 413
    cors_origins = []           # CORS is off unless origins are listed ("*" allows any)
    shutdown_timeout = "10s"    # SIGTERM: drain in-flight requests this long, then stop pools
    openai_bridge = "transformers"  # the bridge behind /v1 (chat, embed, list_models commands)

The token never appears in ``repr``, statistics, logs or the run-time file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final

from . import _config_values as _values

__all__ = [
    "GATEWAY_KEYS",
    "TOKEN_ENV",
    "GatewaySettings",
    "gateway_from_mapping",
    "gateway_to_mapping",
    "is_loopback",
]

TOKEN_ENV: Final = "MLBRIDGE_TOKEN"
GATEWAY_KEYS: Final = (
    "host",
    "port",
    "token",
    "max_body_bytes",
    "cors_origins",
    "shutdown_timeout",
    "openai_bridge",
)
_ORIGIN_RE = re.compile(r"\*|https?://[^\s/]+")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """Settings of the HTTP gateway (``[gateway]``); validated when built."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = field(default=None, repr=False)
    max_body_bytes: int = 16 * 1024 * 1024
    cors_origins: tuple[str, ...] = ()
    shutdown_timeout: float = 10.0
    openai_bridge: str = "transformers"

    def __post_init__(self) -> None:
        # Not validation_context(): a default GatewaySettings is built inside MLBridgeConfig's
        # validation and must not take the loader's context from it.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in _validate(_values.Ctx(), "gateway", values).items():
            if value is not values[key]:
                object.__setattr__(self, key, value)

    @property
    def token_required(self) -> bool:
        return bool(self.token)

    def replace(self, **changes: Any) -> GatewaySettings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in changes:
            if key not in values:
                raise _values.unknown_key(_values.Ctx(), "gateway", key, GATEWAY_KEYS)
        values.update(changes)
        return GatewaySettings(**values)


def _validate(ctx: _values.Ctx, path: str, v: dict[str, Any]) -> dict[str, Any]:
    out = dict(v)
    out["host"] = _values.as_str(ctx, f"{path}.host", v["host"], '"127.0.0.1"')
    port = _values.as_int(ctx, f"{path}.port", v["port"], minimum=0)
    if port is not None and port > 65535:
        raise ctx.error(f"{path}.port", "must be at most 65535", "use a port such as 8765", port)
    out["port"] = port
    token = v["token"]
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ctx.error(
            f"{path}.token",
            "must be a non-empty string",
            f"set a long random string (or leave it out and use {TOKEN_ENV})",
        )
    out["max_body_bytes"] = _values.as_size(
        ctx, f"{path}.max_body_bytes", v["max_body_bytes"], minimum=1024
    )
    origins = v["cors_origins"]
    if isinstance(origins, str) or not isinstance(origins, list | tuple):
        raise _values.type_error(
            ctx,
            f"{path}.cors_origins",
            "a list of origins",
            'write ["http://localhost:3000"]',
            origins,
        )
    for o in origins:
        if not isinstance(o, str) or not _ORIGIN_RE.fullmatch(o):
            raise ctx.error(
                f"{path}.cors_origins",
                "holds something that is not an origin",
                'write origins as scheme://host[:port], e.g. "http://localhost:3000", or "*"',
                o,
            )
    out["cors_origins"] = tuple(origins)
    out["shutdown_timeout"] = _values.as_duration(
        ctx, f"{path}.shutdown_timeout", v["shutdown_timeout"], positive=True
    )
    out["openai_bridge"] = _values.check_name(ctx, f"{path}.openai_bridge", v["openai_bridge"])
    return out


def gateway_from_mapping(ctx: _values.Ctx, path: str, data: Any) -> GatewaySettings:
    """``[gateway]`` from a mapping; missing keys keep their defaults."""
    if not isinstance(data, Mapping):
        raise _values.type_error(ctx, path, "a table", "write a [gateway] table", data)
    for key in data:
        if key not in GATEWAY_KEYS:
            raise _values.unknown_key(ctx, path, key, GATEWAY_KEYS)
    defaults = {f.name: getattr(GatewaySettings(), f.name) for f in fields(GatewaySettings)}
    return GatewaySettings(**_validate(ctx, path, {**defaults, **data}))


def gateway_to_mapping(settings: GatewaySettings) -> dict[str, Any]:
    """The keys that differ from the defaults (``None`` left out), as ``from_mapping`` reads."""
    default = GatewaySettings()
    out: dict[str, Any] = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if value is not None and value != getattr(default, f.name):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
