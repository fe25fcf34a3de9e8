"""Serving the gateway: bind, run uvicorn, announce, drain on SIGTERM, stop every worker.

Theory of operation
-------------------
:func:`serve` runs on the main thread's event loop (``asyncio.run``). It refuses a non-loopback
address without a token, binds the socket itself (so a busy port is a clear error and port 0
gives a real port to announce), and runs a :class:`uvicorn.Server` over :func:`.app.create_app`.
Once uvicorn reports started it calls ``on_ready(url)`` and writes the run-time file
(:mod:`.runtime_file`).

SIGTERM or SIGINT (uvicorn's handlers, which only set flags): the listening socket closes, idle
connections close, in-flight requests (SSE streams included) get up to ``shutdown_timeout``
seconds to finish and are then cancelled; the app's lifespan then closes the bridge (every pool
stopped: TERM, grace, KILL), and :func:`serve` closes it once more (idempotent) in case uvicorn
skipped the lifespan on a forced exit, then removes the run-time file. Unlike plain uvicorn the
signal is not re-raised afterwards: a drained shutdown exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

from mlbridge._api import AsyncMLBridge
from mlbridge._config_gateway import GatewaySettings, is_loopback
from mlbridge.errors import ConfigError

from . import runtime_file
from .app import create_app

__all__ = ["GatewayServer", "bind", "check_bind", "serve", "url_for"]

log = logging.getLogger("mlbridge.gateway")


def check_bind(settings: GatewaySettings) -> None:
    """Refuse a non-loopback address without a token (ConfigError naming the fix)."""
    if not is_loopback(settings.host) and not settings.token:
        raise ConfigError(
            f"refusing to serve on {settings.host!r} without a token: any machine that can "
            "reach that address could run every bridge. Fix: set MLBRIDGE_TOKEN (or --token, or "
            "[gateway] token), or serve on 127.0.0.1",
            key_path="gateway.host",
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (OSError explained as a ConfigError)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot resolve gateway host {host!r} ({exc}). Fix: use an IP address such as "
            "127.0.0.1",
            key_path="gateway.host",
        ) from exc
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror}. Fix: pick a free port with --port "
            "(0 picks one) or stop what is using it",
            key_path="gateway.port",
        ) from exc
    sock.set_inheritable(False)
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class GatewayServer(uvicorn.Server):
    """uvicorn's server, without re-raising the shutdown signal after a drained exit."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
        else:
            self.should_exit = True


async def serve(
    bridge: AsyncMLBridge,
    settings: GatewaySettings,
    *,
    on_ready: Callable[[str], None] | None = None,
    write_runtime_file: bool = True,
) -> int:
    """Serve until SIGTERM/SIGINT, or until the task running it is cancelled (it drains as on
    SIGTERM, then re-raises); returns 0 after a clean shutdown, 1 if startup failed."""
    check_bind(settings)
    sock = bind(settings.host, settings.port)
    url = url_for(sock)
    app = create_app(bridge, settings)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,  # the gateway logs each request itself, with its request id
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=int(max(1, round(settings.shutdown_timeout))),
        server_header=False,
    )
    server = GatewayServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    written = False
    try:
        # uvicorn exposes only a flag for "started" (no event to wait on)
        while not server.started and not task.done():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        if server.started:
            if write_runtime_file:
                written = (
                    runtime_file.write_running(url, token_required=settings.token_required)
                    is not None
                )
            log.info("gateway listening on %s", url)
            if on_ready is not None:
                on_ready(url)
        try:
            await asyncio.shield(task)  # not cancelled with us: it must drain
        except asyncio.CancelledError:  # a cancelled serve() drains as on SIGTERM
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await task
            raise
        return 0 if server.started else 1
    finally:
        if not task.done():  # cancelled from outside: stop serving first
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await task
        sock.close()
        await bridge.close()
        if written:
            runtime_file.remove_running()
