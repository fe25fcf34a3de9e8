"""Gateway benchmark: a request through ``mlbridge serve`` against a direct ``MLBridge`` call.

``python -m bench.gateway_bench [--quick]``

In one run, on the same machine state:

* **request overhead**: p50/p99 of a small ``echo`` sent as ``POST
  /api/frameworks/echo/execute`` to a real ``mlbridge serve`` subprocess over one keep-alive
  connection on 127.0.0.1, against the same call made directly with ``MLBridge`` in this
  process. Measured in interleaved blocks so background load hits all rows alike. Two HTTP
  clients: a minimal one (one ``sendall`` per request, Content-Length framing: what the gateway
  itself costs) and ``httpx`` (what a typical Python caller pays on top).
* **throughput**: requests/s with 64 concurrent HTTP clients (asyncio tasks, one keep-alive
  connection each, the minimal client) on the echo bridge with 2 workers, against 64
  concurrent direct ``AsyncMLBridge`` callers on the same pool size.

The client runs on the same machine as the gateway and its workers, so on a small machine the
numbers include the contention between them. The markdown table is printed and written to
``bench/results/gateway.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from mlbridge._api import AsyncMLBridge, MLBridge

RESULTS = Path(__file__).resolve().parent / "results" / "gateway.md"
ROOT = Path(__file__).resolve().parent.parent
PAYLOAD: dict[str, Any] = {"text": "hello world", "n": 42, "ok": True, "values": [1.5, 2.5, 3.5]}
CLIENTS = 64
DIRECT = "direct MLBridge.execute"
CONFIG = {"bridges": {"echo": {"pool_size": 2, "options": {"lazy": False}}}}
TOML = """
[bridges.echo]
pool_size = 2
[bridges.echo.options]
lazy = false
"""


@contextlib.contextmanager
def gateway() -> Iterator[str]:
    """A real ``mlbridge serve`` on a free port; yields its URL, stops it (SIGTERM) after."""
    with tempfile.TemporaryDirectory(prefix="mlbridge-gw-bench-") as tmp:
        cfg = Path(tmp) / "mlbridge.toml"
        cfg.write_text(TOML)
        env = {**os.environ, "MLBRIDGE_RUNTIME_DIR": str(Path(tmp) / "rt")}
        env.pop("MLBRIDGE_TOKEN", None)
        src = str(ROOT / "src")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlbridge.cli", "serve", "--config", str(cfg), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "listening on" not in line:
                raise RuntimeError(f"mlbridge serve did not start: {line!r}")
            yield line.split("listening on ", 1)[1].split()[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


class RawClient:
    """A minimal HTTP/1.1 keep-alive client (so that the client library is not what we time)."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.host = host
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        header, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status, length = _parse_head(header)
        while len(self.buf) < length:
            self.buf += self._recv()
        out, self.buf = self.buf[:length], self.buf[length:]
        return status, out

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the gateway closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def _parse_head(header: bytes) -> tuple[int, int]:
    lines = header.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, length


async def _raw_async_client(url: str, body: bytes, n: int) -> None:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST /api/frameworks/echo/execute HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        for _ in range(n):
            writer.write(head + body)
            header = await reader.readuntil(b"\r\n\r\n")
            status, length = _parse_head(header[:-4])
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"gateway answered {status}")
    finally:
        writer.close()
        await writer.wait_closed()


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency(url: str, blocks: int, per_block: int) -> dict[str, list[float]]:
    body = {"command": "echo", "args": PAYLOAD}
    raw_body = json.dumps(body).encode()
    path = "/api/frameworks/echo/execute"
    with MLBridge(CONFIG) as bridge, httpx.Client(base_url=url, timeout=60) as client:
        raw = RawClient(url)

        def direct() -> None:
            bridge.execute("echo", "echo", PAYLOAD)

        def via_raw() -> None:
            status, _ = raw.post(path, raw_body)
            if status != 200:
                raise RuntimeError(f"gateway answered {status}")

        def via_httpx() -> None:
            client.post(path, json=body).raise_for_status()

        ways = {
            DIRECT: direct,
            "gateway HTTP, minimal client": via_raw,
            "gateway HTTP, httpx client": via_httpx,
        }
        out: dict[str, list[float]] = {label: [] for label in ways}
        try:
            for fn in ways.values():  # warm every path
                for _ in range(20):
                    fn()
            for block in range(blocks):
                labels = list(ways)
                labels = labels[block % 3 :] + labels[: block % 3]  # rotate the order
                for label in labels:
                    fn, samples = ways[label], out[label]
                    for _ in range(per_block):
                        t0 = time.perf_counter()
                        fn()
                        samples.append(time.perf_counter() - t0)
        finally:
            raw.close()
    return out


async def _http_throughput(url: str, total: int) -> float:
    body = json.dumps({"command": "echo", "args": PAYLOAD}).encode()
    await asyncio.gather(*(_raw_async_client(url, body, 3) for _ in range(CLIENTS)))  # warm
    t0 = time.perf_counter()
    await asyncio.gather(*(_raw_async_client(url, body, total // CLIENTS) for _ in range(CLIENTS)))
    return (total // CLIENTS * CLIENTS) / (time.perf_counter() - t0)


async def _direct_throughput(total: int) -> float:
    async with AsyncMLBridge(CONFIG) as bridge:

        async def one_caller(n: int) -> None:
            for _ in range(n):
                await bridge.execute("echo", "echo", PAYLOAD)

        await asyncio.gather(*(one_caller(5) for _ in range(CLIENTS)))
        t0 = time.perf_counter()
        await asyncio.gather(*(one_caller(total // CLIENTS) for _ in range(CLIENTS)))
        return (total // CLIENTS * CLIENTS) / (time.perf_counter() - t0)


def run(quick: bool) -> str:
    blocks, per_block, total = (6, 50, 1280) if quick else (10, 200, 6400)
    with gateway() as url:
        lat = latency(url, blocks, per_block)
        http_rps = asyncio.run(_http_throughput(url, total))
    direct_rps = asyncio.run(_direct_throughput(total))
    d50 = statistics.median(lat[DIRECT])
    g50 = statistics.median(lat["gateway HTTP, minimal client"])
    h50 = statistics.median(lat["gateway HTTP, httpx client"])
    lines = [
        "# Gateway benchmark",
        "",
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{'quick' if quick else 'full'} run; the client, the gateway and its workers share "
        "the machine (other work may be running: compare rows of this run only).",
        "",
        "| small echo, sequential | p50 | p99 | samples |",
        "|---|---:|---:|---:|",
    ]
    for label, samples in lat.items():
        lines.append(
            f"| {label} | {statistics.median(samples) * 1e3:.3f} ms "
            f"| {_pct(samples, 0.99) * 1e3:.3f} ms | {len(samples)} |"
        )
    lines += [
        "",
        f"Gateway request overhead (p50 difference, minimal client): {(g50 - d50) * 1e3:.3f} ms "
        f"({g50 / d50:.1f}x the direct call); with httpx as the client: "
        f"{(h50 - d50) * 1e3:.3f} ms ({h50 / d50:.1f}x).",
        "",
        f"| {CLIENTS} concurrent callers, echo pool_size=2 | requests/s |",
        "|---|---:|",
        f"| gateway HTTP ({CLIENTS} keep-alive connections) | {http_rps:,.0f} |",
        f"| direct AsyncMLBridge ({CLIENTS} asyncio tasks) | {direct_rps:,.0f} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gateway_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="fewer iterations (about 30 s)")
    ns = p.parse_args(argv)
    text = run(ns.quick)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")
    print(f"(written to {RESULTS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
