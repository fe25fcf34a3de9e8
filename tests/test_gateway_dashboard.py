"""The dashboard's routes over real HTTP against real echo workers: the page and its static
files (no CDN), the JSON snapshot (pools, workers, recent requests, latency per bridge, restarts,
broken bridges), SSE updates arriving one after another, and bad input refused."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from gateway_helpers import ROOT, serving
from host_helpers import config, echo_cfg
from mlbridge import errors
from mlbridge._api import AsyncMLBridge
from mlbridge.gateway import dashboard
from mlbridge.gateway.dashboard import install_dashboard
from obs_helpers import serve

pytestmark = [pytest.mark.gateway, pytest.mark.timeout(300)]

SECRET = "sk-dashboard-test-secret-0123456789"


def _app(bridge: AsyncMLBridge) -> FastAPI:
    app = FastAPI()
    install_dashboard(app, bridge)
    return app


async def _events(client: httpx.AsyncClient, url: str) -> AsyncIterator[dict[str, Any]]:
    async with client.stream("GET", url) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event, data = None, []
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                assert event == "state"
                yield json.loads("\n".join(data))
                event, data = None, []


def test_page_and_static_files_are_served_from_the_package_with_no_cdn() -> None:
    async def main() -> dict[str, str]:
        async with AsyncMLBridge(config(echo_cfg())) as b:
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url) as c:
                out = {}
                for path in ("/", "/dashboard/static/app.js", "/dashboard/static/style.css"):
                    r = await c.get(path)
                    assert r.status_code == 200, path
                    out[path] = r.text
                assert (await c.get("/dashboard/static/nope.js")).status_code == 404
                assert (await c.get("/dashboard/static/../dashboard.py")).status_code == 404
                return out

    files = asyncio.run(main())
    assert "/dashboard/static/app.js" in files["/"] and "/dashboard/static/style.css" in files["/"]
    assert (
        "EventSource" in files["/dashboard/static/app.js"]
        or "/dashboard/events" in files["/dashboard/static/app.js"]
    )
    shipped = resources.files("mlbridge.gateway") / "static"
    for name in ("index.html", "app.js", "style.css"):
        text = (shipped / name).read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text), name  # no CDN


def test_snapshot_has_pools_workers_recent_requests_and_latency() -> None:
    cfg = echo_cfg(pool_size=2, settings={"api_key": SECRET})

    async def main() -> dict[str, Any]:
        async with AsyncMLBridge(config(cfg)) as b:
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url) as c:
                for i in range(4):
                    await b.execute("echo", "echo", {"i": i, "api_key": SECRET})
                with pytest.raises(errors.RemoteError):
                    await b.execute("echo", "fail", {"type": "KeyError", "message": SECRET})
                r = await c.get("/dashboard/state")
                assert r.status_code == 200
                assert SECRET not in r.text
                snap: dict[str, Any] = r.json()
                return snap

    snap = asyncio.run(main())
    (pool,) = snap["pools"]
    assert pool["name"] == "echo" and pool["state"] == "ready" and pool["restarts"] == 0
    assert pool["requests"] == 5 and pool["errors"] == 1 and snap["broken"] == []
    assert (snap["resources"], snap["sessions"], snap["restarts"]) == (0, 0, 0)
    assert len(pool["workers"]) == 2
    for w in pool["workers"]:
        assert w["pid"] > 0 and w["state"] == "idle" and w["rss_bytes"] > 1_000_000
        assert w["uptime"] > 0 and set(w) >= {"requests", "errors"}
    assert sum(w["requests"] for w in pool["workers"]) == 5
    recent = snap["recent_requests"]
    assert [r["command"] for r in recent] == ["fail", "echo", "echo", "echo", "echo"]
    assert recent[0]["ok"] is False and recent[0]["error_code"] == "unknown"
    assert all(r["latency_ms"] > 0 and r["worker_id"].startswith("echo-") for r in recent)
    assert len(snap["latency"]["echo"]) == 5


def test_sse_sends_updates_as_they_happen_and_shows_a_restart() -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with AsyncMLBridge(config(echo_cfg(pool_size=2))) as b:
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
                await b.execute("echo", "ping")
                updates = _events(c, "/dashboard/events?interval=0.1")
                first = await anext(updates)
                await b.execute("echo", "echo", {})
                after_call = await anext(updates)
                victim = first["pools"][0]["workers"][0]["pid"]
                os.kill(victim, signal.SIGKILL)
                async for snap in updates:
                    pool = snap["pools"][0]
                    if pool["restarts"] == 1 and len(pool["workers"]) == 2:
                        await updates.aclose()
                        return first, after_call, snap
                raise AssertionError("the stream ended before the restart showed")

    first, after_call, restarted = asyncio.run(main())
    assert [r["command"] for r in first["recent_requests"]] == ["ping"]
    assert [r["command"] for r in after_call["recent_requests"]] == ["echo", "ping"]
    assert after_call["time"] > first["time"]
    assert restarted["restarts"] == 1
    victim = first["pools"][0]["workers"][0]["pid"]
    assert victim not in [w["pid"] for w in restarted["pools"][0]["workers"]]
    (exit_event,) = [e for e in restarted["worker_events"] if e["event"] == "exited"]
    assert exit_event["pid"] == victim and "SIGKILL" in (exit_event["reason"] or "")


def test_a_broken_bridge_is_reported_with_its_boot_error() -> None:
    bad = echo_cfg("bad", settings={"fail_boot": "no GPU today"}, max_boot_failures=2)

    async def main() -> dict[str, Any]:
        async with AsyncMLBridge(config(echo_cfg(), bad)) as b:
            with pytest.raises(errors.BridgeBrokenError):
                await b.execute("bad", "ping")
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url) as c:
                snap: dict[str, Any] = (await c.get("/dashboard/state")).json()
                return snap

    snap = asyncio.run(main())
    (broken,) = snap["broken"]
    assert broken["name"] == "bad" and "no GPU today" in broken["boot_error"]
    states = {p["name"]: p["state"] for p in snap["pools"]}
    assert states == {"bad": "broken", "echo": "idle"}


@pytest.mark.parametrize("interval", ["0", "abc", "61", "nan"])
def test_a_bad_sse_interval_is_a_400_naming_the_fix(interval: str) -> None:
    async def main() -> httpx.Response:
        async with AsyncMLBridge(config(echo_cfg())) as b:
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url) as c:
                return await c.get(f"/dashboard/events?interval={interval}")

    r = asyncio.run(main())
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_interval" and "0.1 to 60" in err["message"]


# ---------------------------------------------------------------------- the browser test

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
BROWSER_TOML = """
[bridges.echo]
pool_size = 2
[bridges.echo.options]
lazy = false
[bridges.echo.settings]
boot_delay = 3
[bridges.bad]
python_module = "echo"
[bridges.bad.options]
lazy = false
max_boot_failures = 2
restart_backoff = 0.05
[bridges.bad.settings]
fail_boot = "the model file is missing"
"""


def _pids(page: Any) -> list[int]:
    return [int(t) for t in page.locator('[data-pool="echo"] td.pid').all_inner_texts()]


def _wait_text(page: Any, selector: str, text: str, timeout_ms: int = 90_000) -> None:
    page.wait_for_function(
        "([sel, text]) => { const e = document.querySelector(sel); "
        "return e !== null && e.textContent.trim() === text; }",
        arg=[selector, text],
        timeout=timeout_ms,
    )


@pytest.mark.browser
@pytest.mark.timeout(420)
def test_headless_chromium_sees_the_pools_and_a_killed_worker_replaced(tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install "
            "chromium; .ci/run does) to run the dashboard's browser test"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package drives the browser (test extra)"
    )
    sync_playwright = sync_api.sync_playwright

    with serving(tmp_path, BROWSER_TOML) as gw:
        with gw.client() as c:
            for i in range(6):
                r = c.post(
                    "/api/frameworks/echo/execute", json={"command": "echo", "args": {"i": i}}
                )
                assert r.status_code == 200, r.text
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(gw.url + "/")
                echo = '[data-pool="echo"]'
                _wait_text(page, f"{echo} .worker-count", "2")
                _wait_text(page, "#status", "live")
                assert page.locator('[data-pool="bad"] .state').inner_text() == "broken"
                assert "the model file is missing" in page.locator("#broken").inner_text()
                assert page.locator(f"{echo} .restarts").inner_text() == "0"
                assert page.locator("#recent tbody tr").count() >= 6
                assert "2 bridges" in page.locator("#summary").inner_text()
                assert page.locator('canvas.latency[data-bridge="echo"]').count() == 1
                before = _pids(page)
                assert len(before) == 2
                os.kill(before[0], signal.SIGKILL)
                # The replacement boots for 3 s: the page shows one worker, then two again.
                _wait_text(page, f"{echo} .worker-count", "1")
                _wait_text(page, f"{echo} .restarts", "1")
                _wait_text(page, f"{echo} .worker-count", "2")
                after = _pids(page)
                assert before[0] not in after and before[1] in after
                events = page.locator("#events tbody").inner_text()
                assert "exited" in events and str(before[0]) in events
                ARTIFACTS.mkdir(exist_ok=True)
                shot = ARTIFACTS / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
            finally:
                browser.close()


def test_an_sse_stream_ends_by_itself_after_stream_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard, "STREAM_SECONDS", 1.0)

    async def main() -> list[dict[str, Any]]:
        async with AsyncMLBridge(config(echo_cfg())) as b:
            async with serve(_app(b)) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
                return [snap async for snap in _events(c, "/dashboard/events?interval=0.3")]

    snaps = asyncio.run(main())
    # about 1 s of 0.3 s periods: a handful of snapshots, then the response ends (the page
    # reconnects); never an endless response that would hold a graceful shutdown
    assert 2 <= len(snaps) <= 5, len(snaps)
    assert all(s["time"] < t["time"] for s, t in itertools.pairwise(snaps))
