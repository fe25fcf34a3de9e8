"""The gateway's REST API over real HTTP against a real ``mlbridge serve`` process.

One server for the module (echo, a numpy-array bridge and the tiny LM bridge); every route,
SSE arriving incrementally, JSON and MessagePack results, request ids, and 4xx on bad input.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import msgpack
import numpy as np
import pytest

from gateway_helpers import Gateway, serving, sse_events
from mlbridge._protocol.codec import MsgpackCodec
from mlbridge.gateway.runtime_file import RUNTIME_FILE

pytestmark = pytest.mark.gateway

CONFIG = """
default_bridge = "echo"
[bridges.echo]
pool_size = 1
overflow = 1
[bridges.arrays]
python_script = "@BRIDGES@/arrays_bridge.py"
[bridges.tinylm]
python_script = "@BRIDGES@/tiny_lm.py"
[gateway]
openai_bridge = "tinylm"
max_body_bytes = "64KiB"
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with serving(tmp_path_factory.mktemp("gw"), CONFIG) as g:
        yield g


@pytest.fixture
def client(gw: Gateway) -> Iterator[httpx.Client]:
    with gw.client() as c:
        yield c


def _error(r: httpx.Response, status: int) -> dict[str, str]:
    assert r.status_code == status, r.text
    err: dict[str, str] = r.json()["error"]
    assert set(err) >= {"message", "type", "code", "param", "request_id"}
    assert err["request_id"] == r.headers["x-request-id"]
    return err


def test_health_and_readiness(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] is True
    assert set(body["pools"]) == {"echo", "arrays", "tinylm"}
    assert body["broken"] == {}


def test_run_time_file_names_the_server(gw: Gateway) -> None:
    data = json.loads((gw.runtime_dir / RUNTIME_FILE).read_text())
    assert data["url"] == gw.url
    assert data["pid"] == gw.proc.pid
    assert data["token_required"] is False


def test_request_id_on_every_response_and_log_line(gw: Gateway, client: httpx.Client) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "trace-me-123"})
    assert r.headers["x-request-id"] == "trace-me-123"
    r = client.get("/no/such/route")
    err = _error(r, 404)
    assert "openapi.json" in err["message"]
    fresh = r.headers["x-request-id"]
    assert len(fresh) >= 16
    bad = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert bad.headers["x-request-id"] != "bad id\twith spaces"  # not echoed unchecked
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "trace-me-123" not in gw.stderr():
        time.sleep(0.1)
    lines = [ln for ln in gw.stderr().splitlines() if "GET /healthz" in ln]
    assert any("[trace-me-123]" in ln for ln in lines), gw.stderr()[-2000:]
    assert any(f"[{fresh}]" in ln for ln in gw.stderr().splitlines())


def test_execute_and_framework_info_and_stats(client: httpx.Client) -> None:
    r = client.post("/api/frameworks/echo/execute", json={"command": "echo", "args": {"x": [1]}})
    assert r.status_code == 200, r.text
    assert r.json() == {"result": {"x": [1]}}
    frameworks = client.get("/api/frameworks").json()
    assert frameworks["default"] == "echo"
    assert {f["name"] for f in frameworks["frameworks"]} == {"echo", "arrays", "tinylm"}
    info = client.get("/api/frameworks/echo").json()
    assert info["framework"]["name"] == "echo"
    assert "echo" in info["commands"]
    stats = client.get("/api/stats").json()
    assert stats["pools"]["echo"]["requests"] >= 1
    pool = client.get("/api/frameworks/echo/stats").json()
    assert pool["name"] == "echo"
    assert pool["workers"][0]["pid"] > 0


def test_numpy_results_as_json_lists_and_as_msgpack(client: httpx.Client) -> None:
    r = client.post("/api/frameworks/arrays/execute", json={"command": "arrays"})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["matrix"] == [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]]
    assert result["ids"] == [3, 1, 2]
    assert result["scalar"] == 1.5
    r = client.post(
        "/api/frameworks/arrays/execute",
        json={"command": "arrays"},
        headers={"Accept": "application/msgpack"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/msgpack"
    decoded = MsgpackCodec().decode(r.content)["result"]
    assert isinstance(decoded["matrix"], np.ndarray)
    assert decoded["matrix"].dtype == np.float32
    np.testing.assert_array_equal(
        decoded["matrix"], np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    )
    raw = msgpack.unpackb(r.content, raw=False, ext_hook=lambda code, data: ("ext", code))
    assert raw["result"]["matrix"] == ("ext", 1)  # arrays travel as ext type 1, not lists


def test_sse_arrives_incrementally(gw: Gateway) -> None:
    arrivals: list[float] = []
    events = []
    with (
        gw.client() as c,
        c.stream(
            "POST",
            "/api/frameworks/echo/stream",
            json={"command": "stream", "args": {"n": 5, "delay": 0.5}},
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for ev in sse_events(r.iter_lines()):
            arrivals.append(time.monotonic())
            events.append(ev)
    assert [e[0] for e in events] == ["chunk"] * 5 + ["result"]
    assert [e[1]["index"] for e in events[:5]] == [0, 1, 2, 3, 4]
    assert events[-1][1] == {"result": {"chunks": 5, "done": True}}
    # the worker sleeps 0.5 s before each chunk: the first event arrived while four chunks
    # (>= 2 s of sleeping) were still to be made; a buffered reply would show ~0 s here
    assert arrivals[-1] - arrivals[0] >= 1.5


def test_stream_errors_before_the_first_chunk_are_plain_4xx(client: httpx.Client) -> None:
    r = client.post("/api/frameworks/echo/stream", json={"command": "no_such"})
    assert _error(r, 400)["code"] == "unknown_command"
    r = client.post("/api/frameworks/nope/stream", json={"command": "stream"})
    assert _error(r, 404)["code"] == "framework_not_found"


def test_stream_error_mid_stream_is_an_error_event(client: httpx.Client) -> None:
    r = client.post(
        "/api/frameworks/tinylm/stream", json={"command": "stream_then_fail", "args": {"n": 2}}
    )
    assert r.status_code == 200  # the status line went with the first chunk
    events = list(sse_events(iter(r.text.splitlines())))
    assert [e[0] for e in events] == ["chunk", "chunk", "error"], r.text
    err = events[-1][1]["error"]
    assert "failing after 2 chunks" in err["message"]
    assert err["request_id"] == r.headers["x-request-id"]


def test_client_leaving_a_stream_cancels_the_call(gw: Gateway) -> None:
    body = {"command": "stream", "args": {"n": 100, "delay": 0.2}}
    with (
        gw.client() as c,
        c.stream("POST", "/api/frameworks/echo/stream", json=body) as r,
    ):
        first = next(sse_events(r.iter_lines()))
        assert first == ("chunk", {"index": 0})
    # the connection is gone: the worker stops streaming (cancel) long before its 20 s
    deadline = time.monotonic() + 15
    with gw.client() as c:
        while time.monotonic() < deadline:
            workers = c.get("/api/frameworks/echo/stats").json()["workers"]
            if not any(w["busy"] for w in workers):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the stream's worker is still busy: {workers}")


def test_worker_failures_are_5xx_that_say_what_happened(client: httpx.Client) -> None:
    r = client.post(
        "/api/frameworks/echo/execute",
        json={"command": "sleep", "args": {"seconds": 30}, "timeout": 0.5},
    )
    err = _error(r, 504)
    assert err["code"] == "timeout"
    r = client.post(
        "/api/frameworks/echo/execute", json={"command": "crash", "args": {"mode": "exit"}}
    )
    err = _error(r, 502)
    assert err["code"] == "worker_crashed"
    # the pool replaced the worker: the next call works
    r = client.post("/api/frameworks/echo/execute", json={"command": "echo", "args": {"b": 2}})
    assert r.json() == {"result": {"b": 2}}


def test_resources_create_list_execute_stream_delete(client: httpx.Client) -> None:
    r = client.post(
        "/api/frameworks/echo/resources", json={"type": "counter", "config": {"start": 10}}
    )
    assert r.status_code == 201, r.text
    rid = r.json()["resource_id"]
    listed = client.get("/api/resources", params={"framework": "echo"}).json()["resources"]
    assert rid in [x.get("id", x.get("resource_id")) for x in listed]
    r = client.post(f"/api/frameworks/echo/resources/{rid}/execute", json={"inputs": {}})
    assert r.status_code == 200, r.text
    first = r.json()["result"]
    with client.stream(
        "POST", f"/api/frameworks/echo/resources/{rid}/stream", json={"inputs": {"n": 3}}
    ) as s:
        assert s.status_code == 200
        events = list(sse_events(s.iter_lines()))
    assert [e[0] for e in events] == ["chunk", "chunk", "chunk", "result"]
    r = client.delete(f"/api/frameworks/echo/resources/{rid}")
    assert r.status_code == 200, r.text
    r = client.post(f"/api/frameworks/echo/resources/{rid}/execute", json={"inputs": {}})
    assert _error(r, 404)["code"] == "resource_not_found"
    assert first is not None


def test_sessions_create_use_close(client: httpx.Client) -> None:
    r = client.post("/api/frameworks/echo/sessions", json={"ttl": 60})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    r = client.post("/api/frameworks/echo/execute", json={"command": "session", "session_id": sid})
    assert r.status_code == 200, r.text
    assert r.json()["result"] == sid  # the worker saw the call in this session
    r = client.post(
        "/api/frameworks/echo/resources",
        json={"type": "prefixer", "config": {"prefix": "p:"}, "session_id": sid},
    )
    assert r.status_code == 201, r.text
    rid = r.json()["resource_id"]
    r = client.delete(f"/api/sessions/{sid}")
    assert r.status_code == 200, r.text
    assert r.json()["resources_deleted"] == 1
    r = client.post(f"/api/frameworks/echo/resources/{rid}/execute", json={"inputs": {}})
    assert _error(r, 404)["code"] == "resource_not_found"  # closing deleted it
    assert _error(client.delete(f"/api/sessions/{sid}"), 404)["code"] == "session_not_found"


def test_a_session_the_host_expired_is_closed_in_the_gateway_too(client: httpx.Client) -> None:
    r = client.post("/api/frameworks/echo/sessions", json={"ttl": 0.5})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    r = client.post(
        "/api/frameworks/echo/resources",
        json={"type": "prefixer", "config": {"prefix": "p:"}, "session_id": sid},
    )
    rid = r.json()["resource_id"]
    # idle past its ttl, the host's sweep (each second) closes it and deletes its resources;
    # a call on them would count as use, so wait before looking
    time.sleep(3.0)
    r = client.post(f"/api/frameworks/echo/resources/{rid}/execute", json={"inputs": {}})
    assert _error(r, 404)["code"] == "resource_not_found"
    error = _error(client.delete(f"/api/sessions/{sid}"), 404)
    assert error["code"] == "session_not_found" and "ttl expires" in error["message"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "words"),
    [
        (
            "POST",
            "/api/frameworks/echo/execute",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            ["not valid JSON", "Fix:"],
        ),
        ("POST", "/api/frameworks/nope/execute", {"json": {"command": "x"}}, 404, ["'nope'"]),
        (
            "POST",
            "/api/frameworks/echo/execute",
            {"json": {"command": "nope"}},
            400,
            ["unknown command"],
        ),
        (
            "POST",
            "/api/frameworks/echo/execute",
            {"json": {"command": "echo", "args": [1, 2]}},
            400,
            ["args", "Fix:"],
        ),
        ("POST", "/api/frameworks/echo/execute", {"json": {}}, 400, ["command is required"]),
        (
            "POST",
            "/api/frameworks/echo/execute",
            {"json": {"command": "echo", "timeout": -1}},
            400,
            ["timeout"],
        ),
        (
            "POST",
            "/api/frameworks/echo/execute",
            {"json": {"command": "echo", "extra": 1}},
            400,
            ["extra"],
        ),
        (
            "POST",
            "/api/frameworks/echo/execute",
            {"json": {"command": "echo", "args": {"n": 2**70}}},
            400,
            ["64-bit"],
        ),
        ("POST", "/api/frameworks/bad name!/execute", {"json": {"command": "x"}}, 400, []),
        ("DELETE", "/api/frameworks/echo/execute", {}, 405, ["method"]),
        (
            "POST",
            "/api/frameworks/echo/resources",
            {"json": {"type": "no_such_type"}},
            400,
            [],
        ),
        ("DELETE", "/api/frameworks/echo/resources/no-such-id", {}, 404, []),
    ],
)
def test_bad_input_is_4xx_with_cause_and_fix(
    client: httpx.Client,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    words: list[str],
) -> None:
    r = client.request(method, path, **kwargs)  # type: ignore[arg-type]
    err = _error(r, status)
    for w in words:
        assert w in err["message"], err


def test_body_size_limit(client: httpx.Client) -> None:
    big = {"command": "echo", "args": {"text": "x" * 70_000}}
    err = _error(client.post("/api/frameworks/echo/execute", json=big), 413)
    assert "max_body_bytes" in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: read up to the limit, then refused
        yield b'{"command": "echo", "args": {"text": "'
        for _ in range(20):
            yield b"y" * 5000
        yield b'"}}'

    r = client.post(
        "/api/frameworks/echo/execute",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert _error(r, 413)["code"] == "body_too_large"

    def small() -> Iterator[bytes]:
        yield b'{"command": "echo", '
        yield b'"args": {"ok": true}}'

    r = client.post(
        "/api/frameworks/echo/execute",
        content=small(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"result": {"ok": True}}


def test_openapi_document_lists_the_routes(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    paths = set(doc["paths"])
    for p in (
        "/healthz",
        "/readyz",
        "/api/frameworks",
        "/api/frameworks/{framework}",
        "/api/frameworks/{framework}/execute",
        "/api/frameworks/{framework}/stream",
        "/api/frameworks/{framework}/resources",
        "/api/resources",
        "/api/frameworks/{framework}/resources/{resource_id}/execute",
        "/api/frameworks/{framework}/resources/{resource_id}/stream",
        "/api/frameworks/{framework}/resources/{resource_id}",
        "/api/frameworks/{framework}/sessions",
        "/api/sessions/{session_id}",
        "/api/stats",
        "/api/frameworks/{framework}/stats",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/embeddings",
    ):
        assert p in paths, p


def test_cors_is_off_by_default(client: httpx.Client) -> None:
    r = client.get("/healthz", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in r.headers
    r = client.options(
        "/api/stats",
        headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in r.headers


def test_workers_are_remembered_for_the_leak_check(gw: Gateway) -> None:
    # the module's server stops at teardown: stop() asserts these pids are gone by then
    assert gw.remember_workers()
