"""The gateway's ASGI application: :func:`create_app` (FastAPI, served by uvicorn).

``create_app(bridge: AsyncMLBridge, settings: GatewaySettings) -> FastAPI`` builds the app over
one :class:`~mlbridge.AsyncMLBridge`; the app owns it while it runs: the lifespan starts the
bridge (eager pools boot then) and closes it at shutdown (every worker stopped). The signature is
stable; part B's ``install_metrics(app, bridge)`` / ``install_dashboard(app, bridge)`` are called
at its end when those modules exist.

Theory of operation
-------------------
Every HTTP request passes one pure-ASGI middleware, :class:`_Guard` (pure ASGI so that SSE
bodies stream through untouched), in this order:

1. a request id: the client's ``X-Request-ID`` when it is a short token of safe characters,
   else a fresh one; stored in :data:`REQUEST_ID` (a context variable read by
   :class:`RequestIdFilter`, so every log line written while serving the request carries it) and
   sent back as ``X-Request-ID`` on every response, errors included;
2. the bearer token, when one is configured, on every path but :data:`PUBLIC_PATHS` (the health
   probes); the dashboard's page and files also take the cookie ``/?token=`` sets (see
   :data:`PAGE_PATHS`); compared in constant time; never logged or echoed;
3. the body size limit: a ``Content-Length`` over ``max_body_bytes`` is refused before reading,
   a chunked body is read up to the limit and then replayed to the app;
4. one access log line per request (method, path without query, status, duration).

An exception no handler took becomes a 500 in the common error shape (with the request id) and
a logged traceback; mlbridge errors map to 4xx/5xx in :mod:`._errors`. CORS is added only when
``cors_origins`` lists origins.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import importlib.util
import logging
import re
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlbridge import __version__
from mlbridge._api import AsyncMLBridge
from mlbridge._config_gateway import GatewaySettings
from mlbridge._redact import secret_values
from mlbridge.errors import MLBridgeError

from . import _errors
from ._errors import HTTPError

__all__ = [
    "PUBLIC_PATHS",
    "PUBLIC_PREFIXES",
    "REQUEST_ID",
    "RequestIdFilter",
    "create_app",
    "error_response",
]

log = logging.getLogger("mlbridge.gateway")

#: Paths served without the bearer token: the liveness and readiness probes only.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
PUBLIC_PREFIXES: tuple[str, ...] = ()
#: The dashboard's page and static files, which a browser loads without a header: with a token
#: configured they take it as the bearer header, or as the ``mlbridge_token`` cookie that
#: ``/?token=<token>`` sets (HttpOnly, SameSite=Strict) before redirecting to ``/#token=<token>``
#: (the page then sends the token from the fragment to the data routes, which want the header).
PAGE_PATHS = frozenset({"/"})
PAGE_PREFIXES = ("/dashboard/static/",)
TOKEN_COOKIE = "mlbridge_token"

#: The id of the request being served (``"-"`` outside a request).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("mlbridge_request_id", default="-")

_RID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (the request being served, or ``-``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def _secrets(app: FastAPI) -> list[str]:
    found: list[str] = app.state.secrets
    return found


def error_response(
    request: Request | None,
    exc: HTTPError,
    *,
    secrets: list[str] | None = None,
) -> JSONResponse:
    """``exc`` as a JSON response in the common (OpenAI) error shape."""
    if secrets is None:
        secrets = _secrets(request.app) if request is not None else []
    content = _errors.body(
        exc.status,
        exc.message,
        code=exc.code,
        param=exc.param,
        request_id=REQUEST_ID.get(),
        secrets=secrets,
    )
    return JSONResponse(content, status_code=exc.status, headers=exc.headers)


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in exc.errors()[:5]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        param = param or where
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('msg', '')})")
            param = None
        elif err.get("type") == "missing":
            parts.append(f"{where} is required")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
    message = (
        "invalid request: "
        + "; ".join(parts)
        + ". Fix: send a JSON object (Content-Type: application/json) shaped as the "
        "operation's schema in /openapi.json"
    )
    return message, param


class _Guard:
    """Request id, bearer token, body limit and access log (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, *, token: str | None, max_body_bytes: int, secrets: list[str]
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.secrets = secrets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _RID_RE.fullmatch(given) else uuid.uuid4().hex
        ctx_token = REQUEST_ID.set(rid)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        started = [False]
        status = [0]
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                status[0] = message["status"]
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)

        try:
            if self._page_login(scope, headers):
                await self._redirect_with_cookie(scope, receive, send_with_id)
                return
            refusal = self._refusal(scope["path"], headers)
            if refusal is not None:
                await self._send_error(refusal, scope, receive, send_with_id)
                return
            replay = await self._read_body(headers, receive)
            if isinstance(replay, HTTPError):
                await self._send_error(replay, scope, receive, send_with_id)
                return
            await self.app(scope, replay, send_with_id)
        except Exception as exc:
            log.exception("unhandled error serving %s %s", scope.get("method"), scope["path"])
            if not started[0]:
                await self._send_error(_errors.from_exception(exc), scope, receive, send_with_id)
        finally:
            log.info(
                "%s %s -> %d in %.1f ms",
                scope.get("method"),
                scope["path"],
                status[0],
                (time.perf_counter() - t0) * 1000,
            )
            REQUEST_ID.reset(ctx_token)

    def _page_login(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        """``GET /?token=<the token>``: the dashboard's way in for a browser."""
        if self.token is None or scope["path"] != "/" or scope.get("method") != "GET":
            return False
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = (query.get("token") or [""])[0].encode("latin-1", "replace")
        return bool(given) and hmac.compare_digest(given, self.token)

    async def _redirect_with_cookie(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.token is not None
        token = self.token.decode("latin-1")
        fragment = urllib.parse.quote(token, safe="")
        response = Response(status_code=303, headers={"Location": f"/#token={fragment}"})
        response.set_cookie(
            TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/", max_age=30 * 86400
        )
        await response(scope, receive, send)

    def _cookie_ok(self, headers: dict[bytes, bytes]) -> bool:
        assert self.token is not None
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == TOKEN_COOKIE.encode() and hmac.compare_digest(value, self.token):
                return True
        return False

    def _refusal(self, path: str, headers: dict[bytes, bytes]) -> HTTPError | None:
        if self.token is None or path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return None
        page = path in PAGE_PATHS or path.startswith(PAGE_PREFIXES)
        if page and self._cookie_ok(headers):
            return None
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="mlbridge"'}
        if not auth and page:
            return HTTPError(
                401,
                "this gateway requires its token for the dashboard too. Fix: open the page as "
                "/?token=<token> (it sets a cookie and moves the token into the URL fragment), "
                "with the token the gateway was started with (MLBRIDGE_TOKEN, --token or "
                "[gateway] token)",
                code="missing_token",
                headers=challenge,
            )
        if not auth:
            return HTTPError(
                401,
                "missing bearer token: this gateway requires 'Authorization: Bearer <token>' on "
                "every route but /healthz and /readyz. Fix: send the token the gateway was "
                "started with (MLBRIDGE_TOKEN, --token or [gateway] token)",
                code="missing_token",
                headers=challenge,
            )
        if scheme.lower() != b"bearer" or not hmac.compare_digest(value.strip(), self.token):
            return HTTPError(
                401,
                "invalid bearer token. Fix: send 'Authorization: Bearer <token>' with the token "
                "the gateway was started with (MLBRIDGE_TOKEN, --token or [gateway] token)",
                code="invalid_token",
                headers=challenge,
            )
        return None

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> Any:
        limit = self.max_body_bytes
        too_large = HTTPError(
            413,
            f"request body over the gateway's limit of {limit} bytes. Fix: send less (e.g. "
            "fewer texts per call), or raise [gateway] max_body_bytes",
            code="body_too_large",
        )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return HTTPError(400, "Content-Length is not a number", code="bad_request")
            if n > limit:
                return too_large
            return receive  # the server enforces Content-Length itself
        if b"transfer-encoding" not in headers:
            return receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = [False]
        body = b"".join(chunks)

        async def replay() -> Message:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _send_error(self, exc: HTTPError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(None, exc, secrets=self.secrets)
        await response(scope, receive, send)


def _collect_secrets(bridge: AsyncMLBridge, settings: GatewaySettings) -> list[str]:
    found = [settings.token] if settings.token else []
    with contextlib.suppress(Exception):  # best effort: the config's env and settings values
        found.extend(secret_values(bridge.config.to_mapping()))
    return [s for s in found if s and len(s) >= 4]


def create_app(bridge: AsyncMLBridge, settings: GatewaySettings) -> FastAPI:
    """The gateway app over ``bridge`` (started and closed by the app's lifespan)."""
    from . import _openai, _rest

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await bridge.start()
        except MLBridgeError as exc:
            # An eager bridge that cannot boot must not take the others down: serve on, and
            # let /readyz report it. The host itself is up (only the pools' boots failed), so
            # mark the bridge started; its calls then fail with the pool's own error.
            log.error("serving on although a bridge failed to start: %s", exc)
            bridge._started = True
        try:
            yield
        finally:
            await _rest.close_sessions(app)
            await bridge.close()

    app = FastAPI(
        title="mlbridge gateway",
        version=__version__,
        description=(
            "Every mlbridge bridge over HTTP: commands, resources, sessions, Server-Sent Event "
            "streams, and OpenAI-compatible /v1 endpoints backed by the Transformers pool."
        ),
        lifespan=lifespan,
        docs_url=None,  # Swagger UI loads from a CDN; /openapi.json is the document
        redoc_url=None,
    )
    secrets = _collect_secrets(bridge, settings)
    app.state.bridge = bridge
    app.state.settings = settings
    app.state.secrets = secrets
    app.state.sessions = {}

    @app.exception_handler(HTTPError)
    async def _on_http_error(request: Request, exc: HTTPError) -> Response:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation(exc)
        return error_response(request, HTTPError(400, message, code="invalid_request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _on_starlette(request: Request, exc: StarletteHTTPException) -> Response:
        fixes = {
            404: "no such route. Fix: see /openapi.json for the routes this gateway serves",
            405: "method not allowed on this route. Fix: see /openapi.json for its methods",
        }
        message = fixes.get(exc.status_code, str(exc.detail))
        return error_response(
            request, HTTPError(exc.status_code, message, code=f"http_{exc.status_code}")
        )

    app.include_router(_rest.health_router)
    app.include_router(_rest.router)
    app.include_router(_openai.router)

    app.add_middleware(
        _Guard,
        token=settings.token,
        max_body_bytes=settings.max_body_bytes,
        secrets=secrets,
    )
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )

    _install_optional(app, bridge)
    return app


def _install_optional(app: FastAPI, bridge: AsyncMLBridge) -> None:
    """Part B's metrics and dashboard, when their modules are in the tree."""
    for module, func in (("metrics", "install_metrics"), ("dashboard", "install_dashboard")):
        name = f"{__package__}.{module}"
        if importlib.util.find_spec(name) is None:
            continue
        install: Callable[[FastAPI, AsyncMLBridge], Awaitable[None] | None] = getattr(
            importlib.import_module(name), func
        )
        install(app, bridge)
