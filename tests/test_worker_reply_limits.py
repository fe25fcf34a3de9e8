"""A reply over ``max_frame_bytes`` becomes a failure naming the limit; the worker serves on.

Before, the worker wrote the oversized frame, the host refused it and killed the worker, and the
caller got ``WorkerCrashedError`` "likely killed (out of memory...)" (issue 9, item 5).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from host_helpers import config, echo_cfg
from mlbridge import errors
from mlbridge._api import MLBridge
from worker_helpers import Spawner

LIMIT = 64 * 1024


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


def _assert_explains(message: str, size_at_least: int, limit: int = LIMIT) -> None:
    assert f"over the {limit:,}-byte frame limit (max_frame_bytes = {limit})" in message
    size = int(message.split(" is ", 1)[1].split(" bytes encoded", 1)[0].replace(",", ""))
    assert size >= size_at_least
    assert "stream it in chunks" in message
    assert "raise the bridge option max_frame_bytes" in message


def test_oversized_json_reply_is_a_failure_and_the_worker_serves_on(spawn: Spawner) -> None:
    w = spawn(max_frame_bytes=LIMIT)  # v1 JSON, as a DSPEx host
    w.send({"id": 5, "command": "text", "args": {"n": 100_000}})
    reply = w.recv()
    assert reply["id"] == 5 and reply["success"] is False
    assert reply["error_code"] == "frame_too_large"
    assert reply["error_type"] == "FrameTooLargeError"
    assert reply["error"].startswith("the reply to call 5 (text) is ")
    _assert_explains(reply["error"], 100_000)
    # alive, same process, next request answered
    assert w.request("text", {"n": 10}) == "x" * 10
    assert w.request("pid") == w.proc.pid
    # just under the limit still goes through
    assert len(w.request("text", {"n": LIMIT - 200})) == LIMIT - 200


def test_oversized_binary_reply_and_stream_chunk(spawn: Spawner) -> None:
    w = spawn(max_frame_bytes=LIMIT)
    w.hello("msgpack")
    with pytest.raises(errors.FrameTooLargeError) as info:
        w.request("bytes", {"n": 3 * LIMIT})
    _assert_explains(str(info.value), 3 * LIMIT)

    # A chunk too big fails the stream before it is written; nothing oversized ever leaves.
    w.send({"id": 30, "command": "stream", "args": {"n": 3, "size": 2 * LIMIT}, "stream": True})
    reply = w.recv()
    assert reply["id"] == 30 and "chunk" not in reply
    assert reply["success"] is False and reply["error_code"] == "frame_too_large"
    assert reply["error"].startswith("a stream chunk of call 30 is ")
    _assert_explains(reply["error"], 2 * LIMIT)
    assert w.request("stream", {"n": 2}) == [{"index": 0}, {"index": 1}]


def test_through_the_host_the_caller_gets_the_limit_not_a_crash() -> None:
    limit = 1 << 20
    with MLBridge(config(echo_cfg(max_frame_bytes=limit))) as b:
        pid = b.execute("echo", "pid")
        with pytest.raises(errors.FrameTooLargeError) as info:
            b.execute("echo", "text", {"n": 2 * limit})
        _assert_explains(str(info.value), 2 * limit, limit)
        assert b.execute("echo", "pid") == pid  # the same worker: never killed
        assert b.execute("echo", "text", {"n": 5}) == "xxxxx"
