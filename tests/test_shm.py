"""Shared-memory payloads: large arrays and byte strings cross as a handle, both ways and in
stream chunks, and no segment is left behind (normal calls, kill -9 of a worker or of the host).
After a call only the pools' segments remain (see test_shm_pool.py); a one-shot file never.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_helpers import config, echo_cfg, pid_alive, wait_until
from mlbridge import MLBridge, errors
from mlbridge._host import shm_host
from mlbridge._shm import SHM_DIR, ShmOffload

np = pytest.importorskip("numpy")

MiB = 1 << 20


def _segments(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))


_POOLED = re.compile(r"-p[0-9]+-[0-9a-f]{8}\Z")


def _oneshot(prefix: str) -> list[str]:
    """Segments under ``prefix`` that are not a pool's (those stay until the worker exits)."""
    return [n for n in _segments(prefix) if not _POOLED.search(n)]


def _host_prefix() -> str:
    return shm_host.channel_prefix().rsplit("c", 1)[0]  # mlbridge-<pid>-<start>-


def _channel(b: MLBridge) -> Any:
    workers = b._host.pools["echo"].workers
    assert len(workers) == 1
    return workers[0].channel


@pytest.fixture(scope="module")
def bridge() -> Iterator[MLBridge]:
    # max_frame_bytes far below the payloads: they can only have crossed as handles
    cfg = config(echo_cfg(max_frame_bytes=MiB, shm_threshold_bytes=256 * 1024))
    with MLBridge(cfg, env_overrides=False) as b:
        b.execute("echo", "pid", {})
        yield b
    assert _segments(_host_prefix()) == []


def test_arrays_and_bytes_round_trip_identical(bridge: MLBridge) -> None:
    rng = np.random.default_rng(0)
    big = rng.standard_normal((1024, 1024))  # 8 MiB float64
    values = {
        "f64": big,
        "i8": rng.integers(-128, 127, size=3 * MiB, dtype=np.int8),
        "bool": rng.integers(0, 2, size=2 * MiB).astype(bool),
        "strided": big[:, ::2],  # not contiguous: sent as a contiguous copy
        "small": np.arange(10),  # under the threshold: inline as before
        "blob": os.urandom(2 * MiB),
        "buf": bytearray(os.urandom(MiB)),
        "nested": [{"deep": rng.random(512 * 1024)}],
    }
    back = bridge.execute("echo", "echo", values)
    for key in ("f64", "i8", "bool", "strided", "small"):
        assert back[key].dtype == values[key].dtype, key
        assert back[key].shape == values[key].shape, key
        assert np.array_equal(back[key], values[key]), key
    assert back["blob"] == values["blob"] and isinstance(back["blob"], bytes)
    assert back["buf"] == values["buf"]
    assert np.array_equal(back["nested"][0]["deep"], values["nested"][0]["deep"])
    back["f64"][0, 0] = 42.0  # a received array is writable, like any other
    assert _oneshot(_host_prefix()) == []


def test_worker_made_payloads_and_stream_chunks_cross(bridge: MLBridge) -> None:
    data = bridge.execute("echo", "bytes", {"n": 3 * MiB + 1})
    assert len(data) == 3 * MiB + 1 and data[:2] == b"\x00\x01" and data[-1:] == b"\x07"
    chunks = list(bridge.stream("echo", "stream", {"n": 4, "size": 2 * MiB, "binary": True}))
    assert [c["index"] for c in chunks] == [0, 1, 2, 3]
    for c in chunks:
        assert c["data"] == bytes([c["index"]]) * (2 * MiB)
    assert _oneshot(_host_prefix()) == []


def test_without_shared_memory_the_frame_limit_refuses_them() -> None:
    cfg = config(echo_cfg(max_frame_bytes=MiB, shm_threshold_bytes=0))
    with MLBridge(cfg, env_overrides=False) as b:
        with pytest.raises(errors.MLBridgeError, match="max_frame_bytes"):
            b.execute("echo", "echo", {"a": np.zeros(MiB)})
        assert _channel(b).shm is None


def test_kill_9_of_a_worker_mid_transfer_leaves_no_segment() -> None:
    with MLBridge(config(echo_cfg(shm_threshold_bytes=64 * 1024)), env_overrides=False) as b:
        b.execute("echo", "pid", {})
        ch = _channel(b)
        pid = ch.pid
        assert ch.shm is not None
        # 1. a request the worker will never read: it is stopped, then killed
        os.kill(pid, signal.SIGSTOP)
        out: list[BaseException] = []

        def call() -> None:
            try:
                b.execute("echo", "echo", {"a": np.ones(MiB)}, timeout=60)
            except BaseException as exc:
                out.append(exc)

        t = threading.Thread(target=call)
        t.start()
        assert wait_until(lambda: len(_segments(ch.shm.prefix)) > 0, 20)
        # 2. what a worker wrote and had not yet framed when it died
        planted = Path(SHM_DIR, f"{ch.shm.accept}999-deadbeef")
        planted.write_bytes(b"x" * 4096)
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        assert not t.is_alive()
        assert out == []  # it never reached the worker: it ran on the replacement
        assert wait_until(lambda: not planted.exists(), 20)
        assert _segments(ch.shm.prefix) == []
        # 3. and a stream the worker is in the middle of writing
        assert wait_until(lambda: b.statistics().pools["echo"].idle_workers == 1, 30)
        ch2 = _channel(b)
        stream = iter(
            b.stream("echo", "stream", {"n": 1000, "delay": 0.01, "size": MiB, "binary": True})
        )
        next(stream)
        os.kill(ch2.pid, signal.SIGKILL)
        with pytest.raises(errors.MLBridgeError):
            for _ in stream:
                pass
        assert wait_until(lambda: _segments(ch2.shm.prefix) == [], 20)
        assert not pid_alive(pid)


HOST_SCRIPT = """
import os, signal, sys, threading, time
sys.path.insert(0, {tests!r})
import numpy as np
from host_helpers import config, echo_cfg
from mlbridge import MLBridge

b = MLBridge(config(echo_cfg(shm_threshold_bytes=65536)), env_overrides=False)
b.execute("echo", "pid", {{}})
assert len(b.execute("echo", "bytes", {{"n": 1 << 20}})) == 1 << 20  # the worker's pool
pid = b.statistics().pools["echo"].workers[0].pid
os.kill(pid, signal.SIGSTOP)  # it will never read the request below
threading.Thread(
    target=lambda: b.execute("echo", "echo", {{"a": np.ones(1 << 20)}}, timeout=600), daemon=True
).start()
print(pid, flush=True)
time.sleep(600)
"""


def test_segments_of_a_sigkilled_host_are_removed_at_the_next_host_start(tmp_path: Path) -> None:
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(HOST_SCRIPT.format(tests=str(Path(__file__).parent))))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        prefix = f"mlbridge-{proc.pid}-"
        # what the host wrote for the request the stopped worker will never read
        assert wait_until(lambda: any(f"-w{worker}-" not in n for n in _segments(prefix)), 30)
    finally:
        proc.kill()
        proc.wait(30)
    assert wait_until(lambda: not pid_alive(worker), 30)  # died with its host
    left = _segments(prefix)
    assert left  # a SIGKILLed host cannot clean up: the next host must
    print("LEFT", left)
    assert any(_POOLED.search(n) and f"-w{worker}-" in n for n in left)  # the worker's pool too
    assert any(_POOLED.search(n) and f"-w{worker}-" not in n for n in left)  # and the host's
    # a live host's segment (this test process's identity) must survive the sweep
    mine = Path(SHM_DIR, f"{shm_host.channel_prefix()}1-cafebabe")
    mine.write_bytes(b"keep")
    try:
        with MLBridge(config(echo_cfg()), env_overrides=False) as b:
            assert _segments(prefix) == []
            assert mine.exists()
            b.execute("echo", "pid", {})
    finally:
        mine.unlink()


def test_a_handle_outside_the_peers_prefix_is_refused() -> None:
    host = shm_host.channel_prefix()
    side = ShmOffload(host, f"{host}w1-", threshold=1)
    for name in (f"{host}1-aa", "../etc/passwd", f"{host}w1-/../x", 7):
        with pytest.raises(ValueError, match="not a shared-memory handle"):
            side.take(name, 10)
    peer = ShmOffload(f"{host}w1-", host, threshold=1)
    name = peer.put(memoryview(b"abc")).name
    with pytest.raises(ValueError, match="holds 3 bytes, not 10"):
        side.take(name, 10)
    assert not Path(SHM_DIR, name).exists()  # unlinked even so
    peer.close()
    side.close()
    time.sleep(0)


def test_an_encode_that_fails_half_way_leaves_no_segment() -> None:
    from mlbridge._protocol.codec import MsgpackCodec

    host = shm_host.channel_prefix()
    side = ShmOffload(host, f"{host}w1-", threshold=1024)
    codec = MsgpackCodec(side)
    with pytest.raises(errors.UnsupportedPayloadError):
        codec.encode({"a": np.zeros(4096), "b": b"x" * 4096, "c": object()})
    assert _segments(host) == []
    # small messages are encoded exactly as without shared memory
    msg = {"id": 1, "command": "echo", "args": {"x": [1, 2.5, "s", b"b"]}}
    assert codec.encode(msg) == MsgpackCodec().encode(msg)
    # and so does the reused encoder the transports use, which offloads like encode
    encode = codec.encoder()
    with pytest.raises(errors.UnsupportedPayloadError):
        encode({"a": np.zeros(4096), "b": b"x" * 4096, "c": object()})
    assert _segments(host) == []
    assert encode(msg) == MsgpackCodec().encode(msg)
    frame = encode({"a": np.arange(1024, dtype="f8"), "b": b"y" * 2048, "s": "small"})
    assert len(frame) < 1024 and len(_segments(host)) == 2  # both went to shared memory
    peer = MsgpackCodec(ShmOffload(f"{host}w1-", host, threshold=1024))
    back = peer.decode(frame)
    assert back["b"] == b"y" * 2048 and back["s"] == "small"
    assert np.array_equal(back["a"], np.arange(1024, dtype="f8"))
    side.close()
