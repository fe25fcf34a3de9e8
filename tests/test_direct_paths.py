"""The direct call paths: the pieces they are made of, then both APIs through a real host.

A direct call (``MLBridge`` on its caller's thread, ``AsyncMLBridge`` on the loop) reads its own
reply and takes it whole (``Connection.whole_reply``), waits on a ``SyncPending`` only when it
must, and leaves its request record for the telemetry to count in batches.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from host_helpers import config, echo_cfg
from mlbridge import errors
from mlbridge._api import AsyncMLBridge, MLBridge
from mlbridge._host.connection import Connection
from mlbridge._host.pending import SyncPending
from mlbridge._host.telemetry import BATCH, RequestEvent, Telemetry
from mlbridge._protocol.codec import get_codec
from mlbridge._protocol.framing import encode_frame

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- SyncPending


def test_sync_pending_settled_before_wait_returns_at_once() -> None:
    p = SyncPending("echo")
    p.settle({"id": 1, "success": True})
    t0 = time.monotonic()
    assert p.wait(30.0) is True
    assert time.monotonic() - t0 < 1.0
    assert p.reply == {"id": 1, "success": True}


def test_sync_pending_wakes_when_another_thread_settles_it() -> None:
    p = SyncPending("echo")
    boom = errors.WorkerCrashedError("gone")
    threading.Timer(0.2, p.settle, args=(None, boom)).start()
    assert p.wait(30.0) is True
    assert p.error is boom and p.reply is None


def test_sync_pending_wait_times_out_then_still_sees_a_late_settle() -> None:
    p = SyncPending("echo")
    t0 = time.monotonic()
    assert p.wait(0.1) is False
    assert time.monotonic() - t0 >= 0.09
    threading.Timer(0.1, p.settle, args=({"id": 2},)).start()
    assert p.wait(30.0) is True  # a second wait (the cancel grace) on the same lock
    assert p.reply == {"id": 2}


# --------------------------------------------------------------------------- whole_reply


def _framed(conn: Connection) -> None:
    """A connection past hello: its first frame decoded through receive()."""

    class Sink:
        def on_reply(self, rid: int, msg: dict[str, Any]) -> None: ...
        def on_chunk(self, rid: int, chunk: Any) -> None: ...
        def on_callback(self, msg: dict[str, Any]) -> None: ...
        def on_callback_cancel(self, cb: Any) -> None: ...
        def on_stray(self, msg: Any) -> None: ...
        def on_fatal(self, reason: str) -> None:
            raise AssertionError(reason)

    conn.receive(encode_frame(conn.codec.encode({"id": 1, "success": True})), Sink())


def _frame(msg: dict[str, Any]) -> bytes:
    return encode_frame(get_codec("msgpack").encode(msg))


def test_whole_reply_takes_exactly_one_frame_of_its_own_call() -> None:
    conn = Connection(1 << 20)
    conn.use_codec("msgpack")
    assert conn.whole_reply(_frame({"id": 7, "success": True}), 7) is None  # before hello
    _framed(conn)
    mine = _frame({"id": 7, "success": True, "result": {"x": 1}})
    assert conn.whole_reply(mine, 7) == {"id": 7, "success": True, "result": {"x": 1}}
    assert conn.whole_reply(memoryview(mine), 7) is not None
    assert conn.whole_reply(mine, 8) is None  # another call's reply
    assert conn.whole_reply(mine + _frame({"id": 8}), 7) is None  # two frames in one read
    assert conn.whole_reply(mine[:-1], 7) is None  # a frame cut short
    assert conn.whole_reply(_frame({"id": 7, "chunk": 1}), 7) is None  # a stream chunk
    assert conn.whole_reply(b"\x00\x00\x00\x02\xc1\xc1", 7) is None  # not MessagePack


def test_whole_reply_never_takes_bytes_that_continue_a_buffered_frame() -> None:
    conn = Connection(1 << 20)
    conn.use_codec("msgpack")
    _framed(conn)
    seen: list[dict[str, Any]] = []

    class Sink:
        def on_reply(self, rid: int, msg: dict[str, Any]) -> None:
            seen.append(msg)

        def on_chunk(self, rid: int, chunk: Any) -> None: ...
        def on_callback(self, msg: dict[str, Any]) -> None: ...
        def on_callback_cancel(self, cb: Any) -> None: ...
        def on_stray(self, msg: Any) -> None: ...
        def on_fatal(self, reason: str) -> None:
            raise AssertionError(reason)

    # A frame whose payload ends with bytes that look like a whole frame of call 9 (a
    # MessagePack bin holding them), arriving in two reads: header and bin prefix, then those.
    inner = _frame({"id": 9, "success": True})
    payload = b"\xc4" + bytes([len(inner)]) + inner
    first = encode_frame(payload)[: 4 + 2]
    conn.receive(first, Sink())  # a frame is buffered now
    assert conn.whole_reply(inner, 9) is None  # these bytes are the rest of that frame
    strays: list[Any] = []
    sink = Sink()
    sink.on_stray = strays.append  # type: ignore[method-assign]
    conn.receive(inner, sink)
    assert strays == [inner] and seen == []  # one bin value, never a reply to call 9
    assert conn.whole_reply(_frame({"id": 9, "success": True}), 9) is not None  # in step again


# --------------------------------------------------------------------------- telemetry


def test_request_records_are_counted_in_batches_without_hooks() -> None:
    t = Telemetry()
    t.request("echo", "echo", 0.001, True, "echo-1")
    assert t.request_totals == {}  # queued, off the call's path
    t.drain()
    assert t.request_totals[("echo", "echo", True)][0] == 1
    for _ in range(BATCH):
        t.request("echo", "echo", 0.001, True, "echo-1")
    # the BATCH-th record drained the queue itself
    assert t.request_totals[("echo", "echo", True)][0] == 1 + BATCH


def test_a_hook_gets_each_request_event_at_once_and_in_order() -> None:
    t = Telemetry()
    t.request("echo", "first", 0.001, True, "echo-1")  # queued before any hook listens
    seen: list[RequestEvent] = []
    t.add_hook(lambda ev: seen.append(ev) if isinstance(ev, RequestEvent) else None)
    t.request("echo", "second", 0.002, False, "echo-1", "boom", "s-1", 0.5)
    assert [e.command for e in seen] == ["first", "second"]
    ev = seen[1]
    assert (ev.framework, ev.duration_s, ev.success, ev.worker_id) == (
        "echo",
        0.002,
        False,
        "echo-1",
    )
    assert (ev.error_code, ev.session_id, ev.checkout_wait_s) == ("boom", "s-1", 0.5)
    assert ev.time > 0
    assert t.errors[("echo", "boom")] == 1


# --------------------------------------------------------------------------- both APIs


def test_async_direct_calls_slow_failing_and_counted() -> None:
    async def main() -> None:
        async with AsyncMLBridge(config(echo_cfg())) as b:
            events: list[RequestEvent] = []
            b.add_hook(lambda ev: events.append(ev) if isinstance(ev, RequestEvent) else None)
            assert await b.execute("echo", "echo", {"a": 1}) == {"a": 1}
            # a reply that is not there when the request is written: awaited, same answer
            assert await b.execute("echo", "sleep", {"seconds": 0.3}) is not None
            with pytest.raises(errors.RemoteError, match="nope"):
                await b.execute("echo", "fail", {"type": "KeyError", "message": "nope"})
            with pytest.raises(errors.CallTimeoutError):
                await b.execute("echo", "sleep", {"seconds": 5}, timeout=0.2)
            # the worker answered the cancel and serves on
            assert await b.execute("echo", "echo", {"b": 2}) == {"b": 2}
            many = await asyncio.gather(*(b.execute("echo", "echo", {"i": i}) for i in range(50)))
            assert many == [{"i": i} for i in range(50)]
            stats = b.statistics()
            assert stats.pools["echo"].requests == 55
            assert stats.pools["echo"].errors == 2
            assert [e.command for e in events[:3]] == ["echo", "sleep", "fail"]
            assert [e.success for e in events[:4]] == [True, True, False, False]

    asyncio.run(main())


def test_sync_direct_calls_slow_failing_and_counted() -> None:
    with MLBridge(config(echo_cfg())) as b:
        events: list[RequestEvent] = []
        b.add_hook(lambda ev: events.append(ev) if isinstance(ev, RequestEvent) else None)
        assert b.execute("echo", "echo", {"a": 1}) == {"a": 1}
        assert b.execute("echo", "sleep", {"seconds": 0.3}) is not None
        with pytest.raises(errors.RemoteError, match="nope"):
            b.execute("echo", "fail", {"type": "KeyError", "message": "nope"})
        with pytest.raises(errors.CallTimeoutError):
            b.execute("echo", "sleep", {"seconds": 5}, timeout=0.2)
        assert b.execute("echo", "echo", {"b": 2}) == {"b": 2}
        stats = b.statistics()
        assert stats.pools["echo"].requests == 5
        assert stats.pools["echo"].errors == 2
        deadline = time.monotonic() + 10
        while len(events) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)  # (a direct call's event reaches hooks within a loop turn)
        assert [e.command for e in events] == ["echo", "sleep", "fail", "sleep", "echo"]
