"""``mlbridge serve``: the host and its HTTP gateway, until SIGTERM or Ctrl-C.

Settings: ``[gateway]`` in the config file, then ``MLBRIDGE_GATEWAY__*`` and ``MLBRIDGE_TOKEN``,
then the command's options (``--host``, ``--port``, ``--token``, ``--max-body-bytes``,
``--cors-origin``, ``--shutdown-timeout``, ``--openai-bridge``). Prints ``mlbridge gateway
listening on <url>`` (stdout, flushed) once it accepts requests and writes the run-time file
(:mod:`mlbridge.gateway.runtime_file`) that other commands use to find it; removes it on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from .._config_gateway import TOKEN_ENV, GatewaySettings
from ..config import MLBridgeConfig

__all__ = ["add_serve_parser", "run_serve", "settings_from"]


def add_serve_parser(
    sub: Any, add_config: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "serve", help="run the host and its HTTP gateway (REST, SSE, OpenAI /v1) until stopped"
    )
    p.add_argument("--host", help="address to listen on (default [gateway] host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default [gateway] port, 8765; 0: any free)")
    p.add_argument(
        "--token",
        help=f"require 'Authorization: Bearer <token>' (default ${TOKEN_ENV} or [gateway] "
        f"token; prefer ${TOKEN_ENV}: a command line shows in ps)",
    )
    p.add_argument("--max-body-bytes", help="request body limit, e.g. 16MiB")
    p.add_argument(
        "--cors-origin",
        action="append",
        dest="cors_origins",
        metavar="ORIGIN",
        help="allow this browser origin (repeatable; CORS is off by default)",
    )
    p.add_argument("--shutdown-timeout", help="SIGTERM: drain in-flight requests this long")
    p.add_argument("--openai-bridge", help="the bridge behind /v1 (default transformers)")
    p.add_argument("--no-runtime-file", action="store_true", help="do not write the run-time file")
    add_config(p)
    return p


def settings_from(
    config: MLBridgeConfig, ns: argparse.Namespace, environ: dict[str, str] | os._Environ[str]
) -> GatewaySettings:
    """``[gateway]``, then MLBRIDGE_TOKEN, then the command line (each over the one before)."""
    from .._config_gateway import gateway_from_mapping, gateway_to_mapping
    from .._config_values import Ctx

    merged: dict[str, Any] = {**gateway_to_mapping(config.gateway)}
    if config.gateway.token:
        merged["token"] = config.gateway.token
    if environ.get(TOKEN_ENV):
        merged["token"] = environ[TOKEN_ENV]
    options = {
        "host": ns.host,
        "port": ns.port,
        "token": ns.token,
        "max_body_bytes": ns.max_body_bytes,
        "cors_origins": ns.cors_origins,
        "shutdown_timeout": ns.shutdown_timeout,
        "openai_bridge": ns.openai_bridge,
    }
    cli = {k: v for k, v in options.items() if v is not None}
    if cli:
        merged.update(cli)
    return gateway_from_mapping(Ctx(source="command line" if cli else None), "gateway", merged)


def _setup_logging() -> None:
    from ..gateway.app import RequestIdFilter

    fmt = logging.Formatter("mlbridge: %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    root = logging.getLogger("mlbridge")
    for handler in root.handlers:
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(fmt)
        uv = logging.getLogger("uvicorn")
        uv.addHandler(handler)
        uv.setLevel(logging.WARNING)
        uv.propagate = False
    gw = logging.getLogger("mlbridge.gateway")
    if gw.getEffectiveLevel() > logging.INFO:
        gw.setLevel(logging.INFO)  # one access line per request


def run_serve(ns: argparse.Namespace) -> int:
    from .._api import AsyncMLBridge
    from ..gateway import server

    config = MLBridgeConfig.load(ns.config)
    settings = settings_from(config, ns, os.environ)
    # Workers inherit this process's environment: bridge code never needs the gateway's token.
    os.environ.pop(TOKEN_ENV, None)
    server.check_bind(settings)  # before any worker starts
    _setup_logging()

    def ready(url: str) -> None:
        auth = "bearer token required" if settings.token_required else "no token"
        print(f"mlbridge gateway listening on {url} ({auth}); stop with Ctrl-C or SIGTERM")
        sys.stdout.flush()

    async def main() -> int:
        bridge = AsyncMLBridge(config, env_overrides=False)
        return await server.serve(
            bridge, settings, on_ready=ready, write_runtime_file=not ns.no_runtime_file
        )

    return asyncio.run(main())
