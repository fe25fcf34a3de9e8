"""``/metrics`` over real HTTP: the host's series (requests, latency, errors by kind, workers by
state, restarts, RSS, queue depth, checkout wait) and the gateway's own, through prometheus-client,
against real echo workers; labels bounded and free of secrets."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway_helpers import serving
from host_helpers import config, echo_cfg
from mlbridge import errors
from mlbridge._api import AsyncMLBridge
from mlbridge.gateway.metrics import install_metrics
from obs_helpers import samples, serve, value

pytestmark = [pytest.mark.gateway, pytest.mark.timeout(300)]


def _app(bridge: AsyncMLBridge) -> FastAPI:
    """A stand-in gateway: one route that runs an echo command, plus /metrics."""
    app = FastAPI()

    @app.post("/run/{command}")
    async def run(command: str, body: dict[str, Any]) -> Any:
        try:
            return {"result": await bridge.execute("echo", command, body)}
        except errors.MLBridgeError as exc:
            return {"error": exc.code}

    install_metrics(app, bridge)
    return app


async def _scrape(client: httpx.AsyncClient) -> str:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


def test_metrics_show_calls_latency_errors_workers_and_http_series() -> None:
    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg(pool_size=2))) as b:
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url) as c:
                for _ in range(3):
                    assert (await c.post("/run/echo", json={"x": 1})).json() == {"result": {"x": 1}}
                r = await c.post("/run/fail", json={"type": "KeyError"})
                assert r.json() == {"error": "unknown"}
                r = await c.post("/run/no_such_command", json={})
                assert r.json() == {"error": "unknown_command"}
                assert (await c.get("/no/such/page")).status_code == 404
                text = await _scrape(c)
                pids = [w.pid for w in b.statistics().pools["echo"].workers]

        s = samples(text)
        ok = {"framework": "echo", "command": "echo", "success": "true"}
        assert value(text, "mlbridge_requests_total", **ok) == 3
        hist = {"framework": "echo", "command": "echo"}
        assert value(text, "mlbridge_request_duration_seconds_count", **hist) == 3
        assert value(text, "mlbridge_request_duration_seconds_bucket", le="+Inf", **hist) == 3
        assert value(text, "mlbridge_request_duration_seconds_sum", **hist)
        # An unknown command ran nothing: counted, but no latency series of its own.
        bad = {"framework": "echo", "command": "<unregistered>", "success": "false"}
        assert value(text, "mlbridge_requests_total", **bad) == 1
        assert not any("no_such_command" in str(k) for k in s)
        assert value(text, "mlbridge_errors_total", framework="echo", kind="unknown") == 1
        assert value(text, "mlbridge_errors_total", framework="echo", kind="unknown_command") == 1
        assert value(text, "mlbridge_checkout_wait_seconds_count", framework="echo") == 5
        assert value(text, "mlbridge_pool_workers", framework="echo") == 2
        assert value(text, "mlbridge_workers", framework="echo", state="idle") == 2
        assert value(text, "mlbridge_workers", framework="echo", state="busy") == 0
        assert value(text, "mlbridge_pool_state", framework="echo", state="ready") == 1
        assert value(text, "mlbridge_restarts_total", framework="echo") == 0
        assert value(text, "mlbridge_queue_depth", framework="echo") == 0
        assert value(text, "mlbridge_worker_events_total", framework="echo", event="ready") == 2
        rss = [v for (n, _), v in s.items() if n == "mlbridge_worker_rss_bytes"]
        assert len(rss) == len(pids) == 2 and all(v > 1_000_000 for v in rss)
        # The gateway's own series: route templates, never the raw path.
        route = {"method": "POST", "route": "/run/{command}"}
        assert value(text, "mlbridge_http_requests_total", status="200", **route) == 5
        assert value(text, "mlbridge_http_request_duration_seconds_count", **route) == 5
        miss = {"method": "GET", "route": "<unmatched>", "status": "404"}
        assert value(text, "mlbridge_http_requests_total", **miss) == 1
        assert "/no/such/page" not in text

    asyncio.run(main())


def test_restarts_and_worker_events_after_a_worker_is_killed() -> None:
    # Workers take 2 s to boot: the replacement is seen starting before it is live.
    cfg = echo_cfg(pool_size=2, settings={"boot_delay": 2})

    async def main() -> tuple[str, str]:
        async with AsyncMLBridge(config(cfg)) as b:
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url) as c:
                await b.execute("echo", "ping")
                victim = b.statistics().pools["echo"].workers[0].pid
                assert victim is not None
                os.kill(victim, signal.SIGKILL)
                booting = ""
                for _ in range(1200):
                    text = await _scrape(c)
                    if value(text, "mlbridge_workers", framework="echo", state="starting") == 1:
                        booting = text
                    if (
                        value(text, "mlbridge_restarts_total", framework="echo") == 1
                        and value(text, "mlbridge_pool_workers", framework="echo") == 2
                        and value(text, "mlbridge_workers", framework="echo", state="idle") == 2
                    ):
                        return booting, text
                    await asyncio.sleep(0.05)
                raise AssertionError(f"no restart seen in /metrics:\n{text}")

    booting, text = asyncio.run(main())
    assert value(booting, "mlbridge_pool_workers", framework="echo") == 1, booting
    assert value(text, "mlbridge_workers", framework="echo", state="starting") == 0
    assert value(text, "mlbridge_worker_events_total", framework="echo", event="exited") == 1
    assert value(text, "mlbridge_worker_events_total", framework="echo", event="ready") == 3


def test_queue_depth_busy_workers_and_checkout_wait_while_callers_queue() -> None:
    async def main() -> tuple[str, str]:
        async with AsyncMLBridge(config(echo_cfg(pool_size=1))) as b:
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
                await b.execute("echo", "ping")  # boots the pool (that wait is counted too)
                slow = asyncio.ensure_future(c.post("/run/sleep", json={"seconds": 1.5}))
                queued = [asyncio.ensure_future(c.post("/run/echo", json={})) for _ in range(2)]
                during = ""
                for _ in range(600):
                    during = await _scrape(c)
                    if value(during, "mlbridge_queue_depth", framework="echo") == 2:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.gather(slow, *queued)
                return during, await _scrape(c)

    during, after = asyncio.run(main())
    assert value(during, "mlbridge_queue_depth", framework="echo") == 2, during
    assert value(during, "mlbridge_workers", framework="echo", state="busy") == 1
    assert value(after, "mlbridge_queue_depth", framework="echo") == 0
    # The two queued calls waited for the sleeping one (most of its 1.5 s each, on any machine);
    # the sleep found an idle worker.
    waited = value(after, "mlbridge_checkout_wait_seconds_sum", framework="echo")
    assert waited is not None and waited > 1.0, after
    assert value(after, "mlbridge_checkout_wait_seconds_count", framework="echo") == 4
    fast = value(after, "mlbridge_checkout_wait_seconds_bucket", framework="echo", le="0.1")
    assert fast is not None and fast >= 1


def test_no_secret_or_caller_text_in_metric_labels() -> None:
    secret = "sk-metrics-test-secret-0123456789"
    cfg = echo_cfg(pool_size=1, settings={"api_key": secret, "token": secret})

    async def main() -> str:
        async with AsyncMLBridge(config(cfg)) as b:
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url) as c:
                await c.post("/run/echo", json={"api_key": secret})
                await c.post("/run/fail", json={"type": "ValueError", "message": secret})
                for i in range(100):  # junk paths and commands stay in bounded series
                    await c.get(f"/junk/{secret}/{i}")
                    await c.post(f"/run/junk_{i}", json={})
                return await _scrape(c)

    text = asyncio.run(main())
    assert secret not in text and "junk_" not in text and "/junk/" not in text
    assert (
        value(text, "mlbridge_http_requests_total", method="GET", route="<unmatched>", status="404")
        == 100
    )
    assert len(text) < 20000, len(text)


def test_metrics_of_a_real_mlbridge_serve_behind_its_token(tmp_path: Path) -> None:
    token = "tok-metrics-0123456789abcdef"
    with serving(tmp_path, "[bridges.echo]\npool_size = 1\n", token=token) as gw:
        with httpx.Client(base_url=gw.url, timeout=60) as anonymous:
            assert anonymous.get("/metrics").status_code == 401
            assert anonymous.get("/dashboard/state").status_code == 401
            assert anonymous.get("/dashboard/events").status_code == 401
            # the page and its files want the token too: a browser brings it once, in the
            # query, and gets a cookie for the page's files and the token in the fragment
            assert anonymous.get("/").status_code == 401
            assert anonymous.get("/dashboard/static/app.js").status_code == 401
            assert anonymous.get("/?token=wrong").status_code == 401
            login = anonymous.get(f"/?token={token}")
            assert login.status_code == 303
            assert login.headers["location"] == f"/#token={token}"
            cookie = login.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie
            page = anonymous.get("/")  # the cookie, now in the client's jar
            assert page.status_code == 200 and "<html" in page.text.lower()
            assert anonymous.get("/dashboard/static/app.js").status_code == 200
            # the cookie opens the page only: the data routes still want the header
            assert anonymous.get("/dashboard/state").status_code == 401
            assert anonymous.get("/api/stats").status_code == 401
            assert anonymous.get("/dashboard/static/../state").status_code in (401, 404)
        with gw.client() as c:
            r = c.post("/api/frameworks/echo/execute", json={"command": "echo", "args": {}})
            assert r.status_code == 200, r.text
            assert c.get("/dashboard/state").json()["pools"][0]["name"] == "echo"
            text = c.get("/metrics").text
    ok = {"framework": "echo", "command": "echo", "success": "true"}
    assert value(text, "mlbridge_requests_total", **ok) == 1
    assert value(text, "mlbridge_pool_workers", framework="echo") == 1
    execute = {"method": "POST", "route": "/api/frameworks/{framework}/execute", "status": "200"}
    assert value(text, "mlbridge_http_requests_total", **execute) == 1
    refused = {"method": "GET", "route": "/metrics", "status": "401"}
    assert value(text, "mlbridge_http_requests_total", **refused) == 1
    assert token not in text
