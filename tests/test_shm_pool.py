"""Pooled shared-memory segments: reused, but never rewritten while anyone can still read them.

Each side writes payloads into a bounded pool of segments it reuses; a receiver maps them
copy-on-write and its view going away frees the segment. An array sent back unchanged travels as
a handle of the segment it came in (no copy); one its holder wrote into is copied. Nothing is
left after close or after kill -9 of the worker. Real workers, real /dev/shm files.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_helpers import config, pid_alive, wait_until
from mlbridge import MLBridge
from mlbridge._shm import SHM_DIR
from mlbridge._shm_pool import CTRL_BYTES, MAX_SEGMENTS
from mlbridge.config import BridgeConfig, BridgeOptions

np = pytest.importorskip("numpy")

MiB = 1 << 20
N = 2 * MiB // 8  # float64 items of a 2 MiB array
SCRIPT = Path(__file__).parent / "bridges" / "shm_bridge.py"
_POOLED = re.compile(r"-p[0-9]+-[0-9a-f]{8}\Z")


def _bridge(**options: Any) -> MLBridge:
    opts = {
        "health_check_interval": 0.5,
        "timeout": 30.0,
        "startup_timeout": 30.0,
        "shm_threshold_bytes": 64 * 1024,
        **options,
    }
    cfg = BridgeConfig("s", python_script=str(SCRIPT), options=BridgeOptions(**opts))
    b = MLBridge(config(cfg), env_overrides=False)
    b.execute("s", "kept", {})
    return b


@pytest.fixture
def bridge() -> Iterator[MLBridge]:
    b = _bridge()
    prefix = _channel(b).shm.prefix
    try:
        yield b
    finally:
        b.close()
    assert _files(prefix) == []  # close removes both pools


def _channel(b: MLBridge) -> Any:
    workers = b._host.pools["s"].workers
    assert len(workers) == 1
    return workers[0].channel


def _files(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))


def _pooled(prefix: str, *, exclude: str | None = None) -> list[str]:
    return [
        n
        for n in _files(prefix)
        if _POOLED.search(n) and (exclude is None or not n.startswith(exclude))
    ]


def _host_pool(b: MLBridge) -> list[str]:
    ch = _channel(b)
    return _pooled(ch.shm.prefix, exclude=ch.shm.accept)  # the worker's names extend ours


def _worker_pool(b: MLBridge) -> list[str]:
    return _pooled(_channel(b).shm.accept)


def test_a_segment_the_worker_still_views_is_never_rewritten(bridge: MLBridge) -> None:
    # the worker keeps a slice of what it got (as a cache would): that segment stays its own
    assert bridge.execute("s", "keep", {"a": np.ones(N), "slice": True}) == N
    for v in (2.0, 3.0, 4.0):
        got = bridge.execute("s", "echo", {"a": np.full(N, v)})["a"]
        assert np.all(got == v)
        del got
    assert bridge.execute("s", "kept", {}) == [N - 1.0]  # its view still reads the ones
    # the kept segment was not reused: others were made (two, or three when the worker's
    # release of an echoed view came after the host's next call)
    assert len(_host_pool(bridge)) >= 2
    bridge.execute("s", "drop", {})  # once the view is gone, the segment is free again
    before = _host_pool(bridge)
    for v in (5.0, 6.0, 7.0):
        got = bridge.execute("s", "echo", {"a": np.full(N, v)})["a"]
        assert np.all(got == v)
        del got
    assert _host_pool(bridge) == before  # (two free at least: the late release is covered)


def test_a_segment_the_host_still_views_is_never_rewritten(bridge: MLBridge) -> None:
    first = bridge.execute("s", "make", {"n": N, "value": 1.0})
    for v in (2.0, 3.0, 4.0):
        assert np.all(bridge.execute("s", "make", {"n": N, "value": v}) == v)
    assert np.all(first == 1.0)  # the worker wrote three more arrays, none into this one
    assert len(_worker_pool(bridge)) == 2
    first[0] = 9.0  # writable, and private
    del first
    before = _worker_pool(bridge)
    for v in (5.0, 6.0):
        assert np.all(bridge.execute("s", "make", {"n": N, "value": v}) == v)
    assert _worker_pool(bridge) == before  # its segment came free when the host dropped it


def test_an_unchanged_array_goes_back_without_a_copy_and_writes_stay_private(
    bridge: MLBridge,
) -> None:
    a = np.arange(N, dtype=np.float64)
    back = bridge.execute("s", "keep", {"a": a, "back": True})
    assert np.array_equal(back, a)
    assert _worker_pool(bridge) == []  # it went back as a handle of the host's own segment
    back[0] = -1.0  # the host writes into its view of that segment ...
    assert bridge.execute("s", "kept", {}) == [float(a.sum())]  # ... the worker's is untouched
    kept = bridge.execute("s", "kept_arrays", {})[0]  # sent back again, still no copy
    assert np.array_equal(kept, a) and _worker_pool(bridge) == []
    got = bridge.execute("s", "touch", {"a": a, "at": 3, "value": -5.0})
    assert got[3] == -5.0 and a[3] == 3.0 and back[3] == 3.0 and kept[3] == 3.0
    assert np.array_equal(np.delete(got, 3), np.delete(a, 3))
    assert len(_worker_pool(bridge)) == 1  # the worker had written into its view: a copy
    assert back[0] == -1.0 and kept[0] == 0.0


def test_the_pool_stays_within_its_bytes_and_one_shot_files_take_over() -> None:
    b = _bridge(shm_pool_bytes=4 * MiB)
    prefix = _channel(b).shm.prefix
    try:
        held = []
        for i, mib in enumerate([1, 2, 1, 3, 1, 2, 1]):
            a = np.full(mib * MiB // 8, float(i))
            held.append((b.execute("s", "echo", {"a": a})["a"], float(i)))  # all kept alive
            for pool in (_host_pool(b), _worker_pool(b)):
                sizes = [os.stat(os.path.join(SHM_DIR, n)).st_size - CTRL_BYTES for n in pool]
                assert sum(sizes) <= 4 * MiB and len(sizes) <= MAX_SEGMENTS
        for arr, v in held:  # none was overwritten, though the pool ran out on the way
            assert np.all(arr == v)
        held.clear()
        for v in (10.0, 11.0):  # and it serves again once they are gone
            assert np.all(b.execute("s", "echo", {"a": np.full(MiB // 8, v)})["a"] == v)
    finally:
        b.close()
    assert _files(prefix) == []


def test_without_a_pool_every_payload_is_a_one_shot_file() -> None:
    with MLBridge(
        config(
            BridgeConfig(
                "s",
                python_script=str(SCRIPT),
                options=BridgeOptions(shm_threshold_bytes=64 * 1024, shm_pool_bytes=0),
            )
        ),
        env_overrides=False,
    ) as b:
        a = np.arange(N, dtype=np.float64)
        assert np.array_equal(b.execute("s", "echo", {"a": a})["a"], a)
        assert np.all(b.execute("s", "make", {"n": N, "value": 2.0}) == 2.0)
        ch = _channel(b)
        assert ch.shm is not None and ch.shm.pool is None
        assert _files(ch.shm.prefix) == []  # each receiver unlinked what it got


def test_kill_9_of_the_worker_removes_both_pools_and_held_views_stay_valid() -> None:
    b = _bridge()
    try:
        held = b.execute("s", "make", {"n": N, "value": 3.0})
        assert b.execute("s", "keep", {"a": np.ones(N)}) == N
        ch = _channel(b)
        prefix, pid = ch.shm.prefix, ch.pid
        assert _host_pool(b) and _worker_pool(b)
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: _files(prefix) == [], 20)
        assert not pid_alive(pid)
        assert np.all(held == 3.0)  # its mapping outlives the file
        assert wait_until(lambda: b.statistics().pools["s"].idle_workers == 1, 30)
        assert np.all(b.execute("s", "make", {"n": N, "value": 4.0}) == 4.0)  # a new pool
        new_prefix = _channel(b).shm.prefix
        assert new_prefix != prefix
    finally:
        b.close()
    assert _files(new_prefix) == []


def _pair(pool_bytes: int = 64 * MiB) -> tuple[Any, Any]:
    """Two sides of one channel in this process: ``a`` (a host) and ``b`` (its worker)."""
    from mlbridge._host import shm_host
    from mlbridge._shm import ShmOffload

    prefix = shm_host.channel_prefix()
    a = ShmOffload(prefix, f"{prefix}w1-", 1024, pool_bytes)
    b = ShmOffload(f"{prefix}w1-", prefix, 1024, pool_bytes)
    return a, b


def _take(side: Any, lease: Any, nbytes: int) -> Any:
    buf, start = side.take(lease.name, nbytes, lease.offset, lease.mode)
    return np.frombuffer(buf, dtype=np.float64, count=nbytes // 8, offset=start)


def test_a_handle_sent_back_keeps_the_segment_busy_until_it_lands() -> None:
    a, b = _pair()
    try:
        data = np.arange(N, dtype=np.float64)
        sent = a.put(memoryview(data).cast("B"))
        assert sent.mode == "pool"
        seg = a.pool.segments[sent.name]
        view = _take(b, sent, data.nbytes)
        back = b.reuse(view[N // 2 :])  # half of it goes back, as a handle of a's segment
        assert back is not None and back.mode == "back" and back.name == sent.name
        assert back.offset == data.nbytes // 2
        del view  # b lets go of its view before a has read the handle ...
        assert seg.busy()  # ... yet the handle in flight holds the segment
        other = a.put(memoryview(np.zeros(N)).cast("B"))
        assert other.name != sent.name
        other.undo()  # (never framed: its segment is free again)
        got = _take(a, back, data.nbytes // 2)
        assert np.array_equal(got, data[N // 2 :])
        got[0] = -1.0  # private to this view
        del got
        assert not seg.busy()
        again = a.put(memoryview(np.ones(N)).cast("B"))
        assert again.name in (sent.name, other.name)
    finally:
        a.close()
        b.close()


def test_a_written_view_is_not_sent_back_and_an_undone_lease_frees_its_segment() -> None:
    a, b = _pair()
    try:
        data = np.arange(N, dtype=np.float64)
        sent = a.put(memoryview(data).cast("B"))
        view = _take(b, sent, data.nbytes)
        seg = a.pool.segments[sent.name]
        lease = b.reuse(view)  # unwritten: it could go back
        assert lease is not None and lease.mode == "back"
        b.discard([lease])  # (the frame was never sent)
        view[-1] = 0.0  # one page written: only a copy may carry it now
        assert b.reuse(view) is None
        assert b.reuse(view[::2]) is None  # not contiguous
        assert b.reuse(np.arange(N, dtype=np.float64)) is None  # not from a segment
        half = b.reuse(view[: N // 2])  # the untouched half still may
        assert half is not None
        del view
        assert seg.busy()  # that handle is in flight
        b.discard([half])
        assert not seg.busy()
    finally:
        a.close()
        b.close()
    assert not os.path.exists(os.path.join(SHM_DIR, sent.name))


def test_shm_pool_bytes_is_a_validated_size() -> None:
    from mlbridge.config import MLBridgeConfig
    from mlbridge.errors import ConfigError

    def load(value: object) -> int:
        cfg = MLBridgeConfig.from_mapping(
            {"bridges": {"s": {"python_module": "echo", "options": {"shm_pool_bytes": value}}}}
        )
        return cfg.bridges["s"].options.shm_pool_bytes

    assert load("64MiB") == 64 * MiB and load(0) == 0
    with pytest.raises(ConfigError, match=r"options\.shm_pool_bytes: must be at least 0 bytes"):
        load(-1)
