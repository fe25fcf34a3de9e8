"""The live dashboard at ``/``: pools, workers, recent requests, latency per bridge, restarts.

Theory of operation
-------------------
:func:`install_dashboard` adds a :class:`DashboardFeed` as a telemetry hook of the bridge's host.
The hook runs on the host's loop for every event and only appends to bounded deques: the last
:data:`RECENT_REQUESTS` requests, the last :data:`LATENCY_POINTS` latencies of each bridge and
the last :data:`WORKER_EVENTS` worker lifecycle events (exits, restarts, broken pools). A
snapshot (:meth:`DashboardFeed.snapshot`) joins those with the host's statistics at that moment;
it is built on the loop, so it reads host state the way every other host reader does.

Routes (all ``GET``; none takes input beyond the SSE interval):

* ``/`` -- the page (``static/index.html``), which loads ``/dashboard/static/app.js`` and
  ``style.css``: plain JavaScript and canvas, no build step, nothing fetched from elsewhere;
* ``/dashboard/state`` -- one snapshot as JSON (the page polls it when streaming fails);
* ``/dashboard/events`` -- Server-Sent Events: an ``event: state`` snapshot at once, then one
  every ``interval`` seconds (default 1, 0.1 to 60) for about :data:`STREAM_SECONDS` (at least
  one interval), after which the page reconnects: a stream never holds a graceful shutdown for
  long (uvicorn waits for open responses; the app is not told the server is stopping).

The page reads a bearer token from its URL fragment (``/#token=...``, never sent to the server
in the URL) and sends it as ``Authorization: Bearer`` on its requests, so it works when the
gateway requires a token (a browser gets there through ``/?token=...``, which sets the cookie
that opens the page itself: see :data:`.app.PAGE_PATHS`). Snapshots hold no secrets: statistics
never do, and commands are shown as the caller named them (cut to 64 characters), never their
arguments or results.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

from .._host.telemetry import Event, RequestEvent, WorkerEvent

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from .._api import AsyncMLBridge

__all__ = [
    "LATENCY_POINTS",
    "RECENT_REQUESTS",
    "STREAM_SECONDS",
    "WORKER_EVENTS",
    "DashboardFeed",
    "install_dashboard",
]

RECENT_REQUESTS = 50
LATENCY_POINTS = 120
WORKER_EVENTS = 50
#: The longest one SSE response runs before the page reconnects.
STREAM_SECONDS = 10.0
_COMMAND_CHARS = 64
#: Worker events worth showing (start and ready are routine).
_SHOWN_EVENTS = frozenset({"exited", "boot_failed", "broken", "recycled", "retired", "stopped"})


class DashboardFeed:
    """Recent requests, latencies and worker events of one host (bounded), and snapshots."""

    def __init__(self, bridge: AsyncMLBridge) -> None:
        self.bridge = bridge
        self.requests: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)
        self.latency: dict[str, deque[tuple[float, float]]] = {}
        self.worker_events: deque[dict[str, Any]] = deque(maxlen=WORKER_EVENTS)
        self.remove_hook = bridge.add_hook(self.on_event)

    def on_event(self, event: Event) -> None:
        if type(event) is RequestEvent:
            ms = round(event.duration_s * 1000, 3)
            self.requests.append(
                {
                    "time": event.time,
                    "bridge": event.framework,
                    "command": event.command[:_COMMAND_CHARS],
                    "latency_ms": ms,
                    "ok": event.success,
                    "error_code": event.error_code,
                    "worker_id": event.worker_id,
                }
            )
            series = self.latency.get(event.framework)
            if series is None:
                if event.framework not in self.bridge._host.configs:
                    return  # only configured bridges get a series (bounded)
                series = self.latency[event.framework] = deque(maxlen=LATENCY_POINTS)
            series.append((event.time, ms))
        elif type(event) is WorkerEvent and event.event in _SHOWN_EVENTS:
            self.worker_events.append(
                {
                    "time": event.time,
                    "bridge": event.framework,
                    "worker_id": event.worker_id,
                    "pid": event.pid,
                    "event": event.event,
                    "reason": event.reason,
                    "exit_code": event.exit_code,
                }
            )

    def snapshot(self) -> dict[str, Any]:
        """The dashboard's whole state now, JSON-ready (the host's loop thread only)."""
        stats = self.bridge._host.statistics()
        pools = []
        for name, p in stats.pools.items():
            pools.append(
                {
                    "name": name,
                    "state": p.state,
                    "backend": p.backend,
                    "pool_size": p.pool_size,
                    "overflow": p.overflow,
                    "idle_workers": p.idle_workers,
                    "starting_workers": p.starting_workers,
                    "waiting_callers": p.waiting_callers,
                    "requests": p.requests,
                    "errors": p.errors,
                    "restarts": p.restarts,
                    "boot_error": p.boot_error,
                    "uptime": round(p.uptime, 3),
                    "workers": [
                        {
                            "id": w.id,
                            "pid": w.pid,
                            "state": "busy" if w.busy else "idle",
                            "overflow": w.overflow,
                            "rss_bytes": w.rss_bytes,
                            "requests": w.requests,
                            "errors": w.errors,
                            "uptime": round(w.uptime, 3),
                        }
                        for w in p.workers
                    ],
                }
            )
        return {
            "time": time.time(),
            "uptime": round(stats.uptime, 3),
            "default_bridge": stats.default_bridge,
            "resources": stats.resources,
            "sessions": stats.sessions,
            "pools": pools,
            "broken": [
                {"name": p["name"], "boot_error": p["boot_error"]}
                for p in pools
                if p["state"] == "broken"
            ],
            "restarts": sum(p["restarts"] for p in pools),
            "recent_requests": list(reversed(self.requests)),
            "latency": {k: [[t, ms] for t, ms in v] for k, v in sorted(self.latency.items())},
            "worker_events": list(reversed(self.worker_events)),
        }

    async def stream(self, interval: float, request: Request | None = None) -> AsyncIterator[str]:
        """SSE text: a snapshot now, then one every ``interval`` s; the stream ends (after a
        sleep, so a client reconnecting at once still gets one snapshot per ``interval``) once
        STREAM_SECONDS have passed, or when the client has gone."""
        deadline = time.monotonic() + STREAM_SECONDS
        yield "retry: 1000\n\n"
        while True:
            yield f"event: state\ndata: {json.dumps(self.snapshot(), separators=(',', ':'))}\n\n"
            await asyncio.sleep(interval)
            if time.monotonic() + interval > deadline:
                return
            if request is not None and await request.is_disconnected():
                return


def _interval(request: Request) -> float | Response:
    raw = request.query_params.get("interval", "1")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 60:
        return JSONResponse(
            {
                "error": {
                    "message": f"interval={raw!r} is not a number of seconds from 0.1 to 60; "
                    "send e.g. /dashboard/events?interval=1",
                    "type": "invalid_request_error",
                    "code": "invalid_interval",
                }
            },
            status_code=400,
        )
    return value


def install_dashboard(app: Starlette, bridge: AsyncMLBridge) -> DashboardFeed:
    """Serve the dashboard at ``/`` (the module docstring lists the routes)."""
    feed = DashboardFeed(bridge)
    static = resources.files("mlbridge.gateway") / "static"
    index = (static / "index.html").read_text(encoding="utf-8")

    async def page(request: Request) -> Response:
        return HTMLResponse(index, headers={"Cache-Control": "no-cache"})

    async def state(request: Request) -> Response:
        return JSONResponse(feed.snapshot(), headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        interval = _interval(request)
        if isinstance(interval, Response):
            return interval
        return StreamingResponse(
            feed.stream(interval, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    app.add_route("/", page, methods=["GET"], include_in_schema=False)
    app.add_route("/dashboard/state", state, methods=["GET"], include_in_schema=False)
    app.add_route("/dashboard/events", events, methods=["GET"], include_in_schema=False)
    app.mount(
        "/dashboard/static",
        StaticFiles(packages=[("mlbridge.gateway", "static")]),
        name="dashboard-static",
    )
    app.state.mlbridge_dashboard = feed
    return feed
