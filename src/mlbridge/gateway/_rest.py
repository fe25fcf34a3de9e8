"""The REST API: health, frameworks, commands, resources, sessions, stats (under ``/api``).

Routes (bodies and replies are JSON; ``Accept: application/msgpack`` switches replies with
results to MessagePack; ``.../stream`` routes answer with Server-Sent Events):

- ``GET /healthz`` liveness; ``GET /readyz`` readiness (503 naming broken bridges' boot errors)
- ``GET /api/frameworks``; ``GET /api/frameworks/{framework}`` (the bridge's framework info)
- ``GET /api/stats``; ``GET /api/frameworks/{framework}/stats``
- ``POST /api/frameworks/{framework}/restart``: a new pool with the same config (``mlbridge
  restart``), e.g. for a bridge broken at boot once its cause is fixed
- ``POST /api/frameworks/{framework}/execute`` ``{command, args, session_id, timeout}``
- ``POST /api/frameworks/{framework}/stream`` (same body; events ``chunk`` ... ``result``)
- ``POST /api/frameworks/{framework}/resources`` ``{type, config, session_id, resource_id}``
- ``GET /api/resources`` (``?framework=&type=``)
- ``POST /api/frameworks/{framework}/resources/{resource_id}/execute`` ``{inputs, ...}``
- ``POST /api/frameworks/{framework}/resources/{resource_id}/stream``
- ``DELETE /api/frameworks/{framework}/resources/{resource_id}``
- ``POST /api/frameworks/{framework}/sessions`` ``{ttl, session_id}``; ``DELETE
  /api/sessions/{session_id}`` (use a session by passing its ``session_id`` in call bodies)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from mlbridge._api import AsyncMLBridge, AsyncSession
from mlbridge._redact import redact_text
from mlbridge._streams import AsyncStream
from mlbridge.errors import MLBridgeError

from . import _errors
from ._encode import render
from ._errors import HTTPError
from ._sse import event, prefetch, sse_response

__all__ = ["close_sessions", "health_router", "router"]

log = logging.getLogger("mlbridge.gateway")
health_router = APIRouter(tags=["health"])
router = APIRouter(prefix="/api", tags=["api"])

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
Framework = Annotated[
    str, Path(pattern=_NAME, max_length=100, description="a configured bridge's name")
]
ResourceId = Annotated[str, Path(min_length=1, max_length=200)]
_TIMEOUT = Field(None, gt=0, le=86400, description="seconds; null: the bridge's default")


class ExecuteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    command: str = Field(min_length=1, max_length=200, description="e.g. 'echo' or 'chat'")
    args: dict[str, Any] = Field(default_factory=dict)
    session_id: str | None = Field(None, max_length=200)
    timeout: float | None = _TIMEOUT


class CreateResourceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(min_length=1, max_length=100, description="e.g. 'counter', 'model'")
    config: dict[str, Any] = Field(default_factory=dict)
    session_id: str | None = Field(None, max_length=200)
    resource_id: str | None = Field(None, min_length=1, max_length=200)
    timeout: float | None = _TIMEOUT


class ExecuteResourceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: dict[str, Any] = Field(default_factory=dict)
    session_id: str | None = Field(None, max_length=200)
    timeout: float | None = _TIMEOUT


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ttl: float | None = Field(None, gt=0, le=86400 * 30, description="idle seconds before expiry")
    session_id: str | None = Field(None, min_length=1, max_length=200)


def _bridge(request: Request) -> AsyncMLBridge:
    bridge: AsyncMLBridge = request.app.state.bridge
    return bridge


def _known(request: Request, framework: str) -> None:
    """404 for a bridge that is not configured, before any call is attempted."""
    names = _bridge(request).list_frameworks()
    if framework not in names:
        raise HTTPError(
            404,
            f"no bridge named {framework!r} is configured (configured: "
            f"{', '.join(names) or 'none'}). Fix: use one of those names, or add "
            f"[bridges.{framework}] to mlbridge.toml",
            code="framework_not_found",
            param="framework",
        )


async def _call(coro: Any) -> Any:
    try:
        return await coro
    except HTTPError:
        raise
    except Exception as exc:
        if not isinstance(exc, MLBridgeError):  # a gateway bug, not a bridge's answer
            log.exception("unexpected error while calling the host")
        raise _errors.from_exception(exc) from exc


def _error_events(request: Request) -> Any:
    secrets = request.app.state.secrets

    def on_error(exc: HTTPError) -> list[bytes]:
        from .app import REQUEST_ID

        body = _errors.body(
            exc.status, exc.message, code=exc.code, request_id=REQUEST_ID.get(), secrets=secrets
        )
        return [event(body, "error")]

    return on_error


async def _stream_response(request: Request, stream: AsyncStream) -> Response:
    first = await _call(prefetch(stream))
    return sse_response(
        stream,
        first,
        on_chunk=lambda c: [event(c, "chunk")],
        on_end=lambda r: [event({"result": r}, "result")],
        on_error=_error_events(request),
    )


# ---------------------------------------------------------------------- health


@health_router.get("/healthz", summary="Liveness: the gateway process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health_router.get(
    "/readyz",
    summary="Readiness: every eager pool ready, no broken bridge",
    responses={503: {"description": "not ready: starting pools or broken bridges"}},
)
async def readyz(request: Request) -> JSONResponse:
    bridge = _bridge(request)
    stats = bridge.statistics()
    secrets = request.app.state.secrets
    pools: dict[str, Any] = {}
    broken: dict[str, str] = {}
    waiting: list[str] = []
    for name, pool in stats.pools.items():
        cfg = bridge.config.bridges.get(name)
        lazy = cfg.options.lazy if cfg is not None else True
        boot_error = redact_text(pool.boot_error, secrets) if pool.boot_error else None
        pools[name] = {"state": pool.state, "lazy": lazy, "boot_error": boot_error}
        if pool.state == "broken":
            broken[name] = boot_error or "its workers keep failing to boot"
        elif not lazy and pool.state != "ready":
            waiting.append(name)
    ready = not broken and not waiting
    body = {"ready": ready, "pools": pools, "broken": broken, "starting": waiting}
    return JSONResponse(body, status_code=200 if ready else 503)


# ---------------------------------------------------------------------- frameworks, stats


@router.get("/frameworks", summary="The configured bridges and their pool states")
async def list_frameworks(request: Request) -> dict[str, Any]:
    bridge = _bridge(request)
    stats = bridge.statistics()
    return {
        "default": stats.default_bridge,
        "frameworks": [
            {"name": name, "state": pool.state, "workers": len(pool.workers)}
            for name, pool in stats.pools.items()
        ],
    }


@router.get("/frameworks/{framework}", summary="A bridge's framework info (starts its pool)")
async def framework_info(request: Request, framework: Framework) -> Response:
    _known(request, framework)
    info = await _call(_bridge(request).get_framework_info(framework))
    return render(request, info)


@router.get("/stats", summary="Statistics of the host, its pools and workers")
async def host_stats(request: Request) -> dict[str, Any]:
    return _bridge(request).statistics().to_dict()


@router.get("/frameworks/{framework}/stats", summary="Statistics of one bridge's pool")
async def pool_stats(request: Request, framework: Framework) -> dict[str, Any]:
    _known(request, framework)
    stats: dict[str, Any] = await _call(_bridge(request).get_stats(framework))
    return stats


@router.post(
    "/frameworks/{framework}/restart",
    summary="Restart a bridge's pool (one broken at boot too), after fixing what broke it",
)
async def restart(request: Request, framework: Framework) -> Response:
    _known(request, framework)
    bridge = _bridge(request)
    await _call(bridge.update_config(framework))  # no change: a new pool with the same config
    pool = bridge.pool_statistics(framework)
    return render(request, {"framework": framework, "restarted": True, "state": pool.state})


# ---------------------------------------------------------------------- commands


@router.post("/frameworks/{framework}/execute", summary="Run a command; its result")
async def execute(request: Request, framework: Framework, body: ExecuteRequest) -> Response:
    _known(request, framework)
    result = await _call(
        _bridge(request).execute(
            framework, body.command, body.args, session_id=body.session_id, timeout=body.timeout
        )
    )
    return render(request, {"result": result})


@router.post(
    "/frameworks/{framework}/stream",
    summary="Run a streaming command: Server-Sent Events 'chunk' ..., then 'result'",
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream(request: Request, framework: Framework, body: ExecuteRequest) -> Response:
    _known(request, framework)
    s = _bridge(request).stream(
        framework, body.command, body.args, session_id=body.session_id, timeout=body.timeout
    )
    return await _stream_response(request, s)


# ---------------------------------------------------------------------- resources


@router.post(
    "/frameworks/{framework}/resources", summary="Create a host-owned resource", status_code=201
)
async def create_resource(
    request: Request, framework: Framework, body: CreateResourceRequest
) -> Response:
    _known(request, framework)
    rid = await _call(
        _bridge(request).create_resource(
            framework,
            body.type,
            body.config,
            session_id=body.session_id,
            resource_id=body.resource_id,
            timeout=body.timeout,
        )
    )
    return render(request, {"resource_id": rid, "framework": framework, "type": body.type}, 201)


@router.get("/resources", summary="List host-owned resources")
async def list_resources(
    request: Request,
    framework: Annotated[str | None, Query(max_length=100)] = None,
    type: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    if framework is not None:
        _known(request, framework)
    items = await _call(_bridge(request).list_resources(framework, type))
    return render(request, {"resources": items})


@router.post("/frameworks/{framework}/resources/{resource_id}/execute", summary="Run a resource")
async def execute_resource(
    request: Request, framework: Framework, resource_id: ResourceId, body: ExecuteResourceRequest
) -> Response:
    _known(request, framework)
    result = await _call(
        _bridge(request).execute_resource(
            framework, resource_id, body.inputs, session_id=body.session_id, timeout=body.timeout
        )
    )
    return render(request, {"result": result})


@router.post(
    "/frameworks/{framework}/resources/{resource_id}/stream",
    summary="Stream a resource's output as Server-Sent Events",
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_resource(
    request: Request, framework: Framework, resource_id: ResourceId, body: ExecuteResourceRequest
) -> Response:
    _known(request, framework)
    s = _bridge(request).stream_resource(
        framework, resource_id, body.inputs, session_id=body.session_id, timeout=body.timeout
    )
    return await _stream_response(request, s)


@router.delete("/frameworks/{framework}/resources/{resource_id}", summary="Delete a resource")
async def delete_resource(
    request: Request, framework: Framework, resource_id: ResourceId
) -> Response:
    _known(request, framework)
    result = await _call(_bridge(request).delete_resource(framework, resource_id))
    return render(request, {"deleted": resource_id, "result": result})


# ---------------------------------------------------------------------- sessions


@router.post(
    "/frameworks/{framework}/sessions",
    summary="Open a session (pass its session_id in later calls)",
    status_code=201,
)
async def create_session(
    request: Request, framework: Framework, body: CreateSessionRequest | None = None
) -> Response:
    _known(request, framework)
    body = body or CreateSessionRequest.model_validate({})
    bridge = _bridge(request)
    await _call(bridge.start())
    try:
        session = bridge.session(framework, ttl=body.ttl, session_id=body.session_id)
    except Exception as exc:
        raise _errors.from_exception(exc) from exc
    sessions: dict[str, AsyncSession] = request.app.state.sessions
    for sid in [sid for sid, s in sessions.items() if not s.open]:  # the host expired them
        del sessions[sid]
    sessions[session.id] = session
    return render(request, {"session_id": session.id, "framework": framework, "ttl": body.ttl}, 201)


@router.delete("/sessions/{session_id}", summary="Close a session (deletes its resources)")
async def close_session(
    request: Request, session_id: Annotated[str, Path(min_length=1, max_length=200)]
) -> Response:
    sessions: dict[str, AsyncSession] = request.app.state.sessions
    session = sessions.pop(session_id, None)
    if session is None or not session.open:
        raise HTTPError(
            404,
            f"no open session {session_id!r}. Fix: open one with POST "
            "/api/frameworks/{framework}/sessions (sessions also close when their ttl expires)",
            code="session_not_found",
            param="session_id",
        )
    removed = await _call(session.close())
    return render(request, {"closed": session_id, "resources_deleted": removed})


async def close_sessions(app: FastAPI) -> None:
    """Close every session opened through the gateway (at shutdown)."""
    sessions: dict[str, AsyncSession] = app.state.sessions
    while sessions:
        _, session = sessions.popitem()
        with contextlib.suppress(Exception):
            await session.close()
