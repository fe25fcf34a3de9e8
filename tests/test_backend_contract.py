"""The backend seam's contract, run against every backend (local pipes, the socket pair, and Ray
actors on the real local Ray cluster the session shares, ``ray_cluster`` in conftest; skipped
without Ray).

Each test drives a real worker through ``Backend.start(spec, events, loop)`` and the transport
it returns, speaking frames with the host's sans-I/O Connection, then the same scenarios through
a whole host whose bridge uses that backend.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from host_helpers import config, echo_cfg, pid_alive, wait_until
from mlbridge import errors
from mlbridge._api import AsyncMLBridge, MLBridge
from mlbridge._backends import BACKENDS, SETTINGS_ENV, WorkerSpec, get_backend, worker_command
from mlbridge._host.connection import Connection

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:  # the suite passes without the ray extra: only the ray cases skip
    HAVE_RAY = False

BACKEND_NAMES = [
    pytest.param(
        n, marks=[pytest.mark.ray, pytest.mark.skipif(not HAVE_RAY, reason="needs mlbridge[ray]")]
    )
    if n == "ray"
    else n
    for n in sorted(BACKENDS)
]


@pytest.fixture(autouse=True)
def _cluster_for_ray_cases(request: pytest.FixtureRequest) -> None:
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("name") == "ray":
        request.getfixturevalue("ray_cluster")


@pytest.fixture(autouse=True)
def _fork_templates_closed(request: pytest.FixtureRequest) -> Iterator[None]:
    """The fork backend's warm templates outlive a raw ``Backend.start``: stop them after."""
    yield
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("name") == "fork":
        from mlbridge._backends.fork import close_templates

        close_templates()


async def settled_pid(transport: Any, timeout: float = 60.0) -> int:
    """The worker's pid: at once for local backends, once the actor has it for ray."""
    deadline = asyncio.get_running_loop().time() + timeout
    while transport.pid is None:
        assert asyncio.get_running_loop().time() < deadline, "the worker never got a pid"
        await asyncio.sleep(0.02)
    return int(transport.pid)


class Recorder:
    """TransportEvents + ConnectionEvents: collects what a worker sends."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self.conn = Connection(1 << 20)
        self.replies: dict[int, dict[str, Any]] = {}
        self.chunks: list[Any] = []
        self.stderr = bytearray()
        self.exit: tuple[int | None, int | None] | None = None
        self.exit_count = 0
        self.threads: set[int] = set()
        self.reply_threads: dict[int, int] = {}
        self.changed = asyncio.Event()

    # TransportEvents
    def data_received(self, data: memoryview) -> None:
        self.threads.add(threading.get_ident())
        self.conn.receive(data, self)

    def stderr_received(self, data: bytes) -> None:
        self.stderr += data

    def process_exited(self, returncode: int | None, consumed: int | None) -> None:
        self.exit = (returncode, consumed)
        self.exit_count += 1
        self.changed.set()

    # ConnectionEvents
    def on_reply(self, rid: int, msg: dict[str, Any]) -> None:
        self.replies[rid] = msg
        self.reply_threads[rid] = threading.get_ident()
        if threading.get_ident() == self.loop_thread:
            self.changed.set()
        else:
            self.loop.call_soon_threadsafe(self.changed.set)

    def on_chunk(self, rid: int, chunk: Any) -> None:
        self.chunks.append(chunk)

    def on_callback(self, msg: dict[str, Any]) -> None:
        pass

    def on_callback_cancel(self, cb: Any) -> None:
        pass

    def on_stray(self, msg: Any) -> None:
        pass

    def on_fatal(self, reason: str) -> None:
        raise AssertionError(reason)

    async def until(self, pred: Any, timeout: float = 60.0) -> None:
        async def wait() -> None:
            while not pred():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)


def spec(worker_id: str = "c-1", **kw: Any) -> WorkerSpec:
    return WorkerSpec(
        bridge="echo",
        worker_id=worker_id,
        target="echo",
        python=sys.executable,
        env=dict(os.environ),
        parent_pid=os.getpid(),
        **kw,
    )


def send(rec: Recorder, transport: Any, rid: int, command: str, args: dict[str, Any]) -> None:
    header, payload = rec.conn.request(rid, command, args)
    transport.write(header, payload)


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_round_trips_then_eof_exit_0_reported_once_on_the_loop(name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder(loop)
        transport = get_backend(name).start(spec(), rec, loop)
        assert pid_alive(await settled_pid(transport))
        send(rec, transport, 1, "echo", {"x": 1})
        send(rec, transport, 2, "echo", {"y": "z" * 200_000})  # more than one read
        await rec.until(lambda: len(rec.replies) == 2)
        assert rec.replies[1]["result"] == {"x": 1}
        assert rec.replies[2]["result"] == {"y": "z" * 200_000}
        assert transport.written > 200_000
        transport.close_input()
        await rec.until(lambda: rec.exit is not None)
        assert rec.exit is not None and rec.exit[0] == 0
        await asyncio.sleep(0.1)
        assert rec.exit_count == 1
        assert rec.threads == {threading.get_ident()}  # callbacks on the loop thread
        with pytest.raises(BrokenPipeError):
            send(rec, transport, 3, "echo", {})

    asyncio.run(main())


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_worker_stderr_reaches_the_host_and_stdout_stays_clean(name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder(loop)
        transport = get_backend(name).start(spec(), rec, loop)
        send(rec, transport, 1, "print", {"text": "stray print", "stderr": True})
        send(rec, transport, 2, "echo", {"after": True})
        await rec.until(lambda: 2 in rec.replies)
        assert rec.replies[2]["result"] == {"after": True}
        transport.close_input()
        await rec.until(lambda: rec.exit is not None)
        assert b"stray print" in rec.stderr

    asyncio.run(main())


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_signal_reaches_the_whole_process_group_and_exit_is_explained(name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder(loop)
        transport = get_backend(name).start(spec(), rec, loop)
        send(rec, transport, 1, "pid", {})
        await rec.until(lambda: 1 in rec.replies)
        assert rec.replies[1]["result"] == await settled_pid(transport)
        pgid = os.getpgid(transport.pid)
        assert pgid == transport.pid  # its own process group
        transport.signal(signal.SIGKILL)
        await rec.until(lambda: rec.exit is not None)
        assert rec.exit is not None and rec.exit[0] == -signal.SIGKILL
        assert wait_until(lambda: not pid_alive(transport.pid or 0), 5)
        transport.signal(signal.SIGKILL)  # after the exit: a no-op, never another process

    asyncio.run(main())


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_read_now_from_another_thread_delivers_there(name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder(loop)
        transport = get_backend(name).start(spec(), rec, loop)
        send(rec, transport, 1, "echo", {"warm": 1})
        await rec.until(lambda: 1 in rec.replies)

        seen: list[int] = []

        def reader() -> None:
            send(rec, transport, 2, "echo", {"from": "thread"})
            for _ in range(200_000):
                n = transport.read_now()
                if n > 0 or 2 in rec.replies:
                    seen.append(n)
                    break

        # the loop is blocked in the join below, so only the thread can read the reply
        t = threading.Thread(target=reader)
        t.start()
        t.join(20)
        assert 2 in rec.replies and rec.replies[2]["result"] == {"from": "thread"}
        assert len(rec.threads) == 2
        transport.close_input()
        await rec.until(lambda: rec.exit is not None)

    asyncio.run(main())


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_read_view_hands_the_bytes_back_unrouted_and_keeps_the_output_locked(name: str) -> None:
    """read_view (a direct call's read): the bytes come back to the caller, not through
    data_received, and no other read happens until end_view; a transport that delivers output
    only through its events answers -1, and the reply then arrives that way."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder(loop)
        transport = get_backend(name).start(spec(), rec, loop)
        send(rec, transport, 1, "echo", {"warm": 1})
        await rec.until(lambda: 1 in rec.replies)
        send(rec, transport, 2, "echo", {"view": "me"})
        view: Any = -1
        for _ in range(2000):  # (the loop's own reader could take it first: it does not run)
            view = transport.read_view()
            if not isinstance(view, int) or 2 in rec.replies:
                break
            if name == "ray":
                await asyncio.sleep(0)
            else:
                os.sched_yield()
        if name == "ray":
            assert view == -1  # the socket is read by the loop's reader only
            await rec.until(lambda: 2 in rec.replies)
        else:
            assert isinstance(view, memoryview), view
            try:
                assert 2 not in rec.replies  # not routed
                assert transport.read_now() == -1  # locked: another read waits for end_view
                reply = rec.conn.whole_reply(view, 2)
                assert reply is not None and reply["result"] == {"view": "me"}
                assert rec.conn.whole_reply(view, 3) is None  # someone else's: not taken
            finally:
                transport.end_view()
        send(rec, transport, 3, "echo", {"after": 1})
        await rec.until(lambda: 3 in rec.replies)  # reading goes on after end_view
        transport.close_input()
        await rec.until(lambda: rec.exit is not None)

    asyncio.run(main())


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_held_output_is_read_by_the_holding_thread_while_the_loop_runs(name: str) -> None:
    """hold_output: the reply reaches the caller thread in read_wait, never the (running) loop;
    a transport that cannot hold says so and the loop reads as usual."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder(loop)
        transport = get_backend(name).start(spec(), rec, loop)
        send(rec, transport, 1, "echo", {"warm": 1})
        await rec.until(lambda: 1 in rec.replies)

        def caller() -> bool:
            if not transport.hold_output():
                send(rec, transport, 2, "echo", {"held": False})
                return False
            try:
                send(rec, transport, 2, "echo", {"held": True})
                for _ in range(100):
                    if 2 in rec.replies or transport.read_wait(0.2) == 0:
                        break
            finally:
                transport.release_output()
            return True

        held = await loop.run_in_executor(None, caller)
        await rec.until(lambda: 2 in rec.replies)
        assert rec.replies[2]["result"] == {"held": held}
        if held:
            assert rec.reply_threads[2] != rec.loop_thread
        else:
            assert name != "local"  # pipes can hold; a socket the loop reads may not
            assert rec.reply_threads[2] == rec.loop_thread
        # released: the loop reads again
        send(rec, transport, 3, "echo", {"after": 1})
        await rec.until(lambda: 3 in rec.replies)
        assert rec.reply_threads[3] == rec.loop_thread
        transport.close_input()
        await rec.until(lambda: rec.exit is not None)

    asyncio.run(main())


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_parked_output_is_not_read_until_watched_and_holds_again_for_free(name: str) -> None:
    """release_output(park=True): the loop does not read what comes next until watch_output
    (it then reads at once); a parked output is held again by the next caller."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder(loop)
        transport = get_backend(name).start(spec(), rec, loop)
        send(rec, transport, 1, "echo", {"warm": 1})
        await rec.until(lambda: 1 in rec.replies)

        def held_call(rid: int, park: bool) -> bool:
            if not transport.hold_output():
                send(rec, transport, rid, "echo", {"rid": rid})  # the loop reads it
                return False
            try:
                send(rec, transport, rid, "echo", {"rid": rid})
                for _ in range(100):
                    if rid in rec.replies or transport.read_wait(0.2) == 0:
                        break
            finally:
                transport.release_output(park=park)
            return True

        held = await loop.run_in_executor(None, held_call, 2, True)
        await rec.until(lambda: 2 in rec.replies)
        if not held:  # the socket pair and Ray cannot hold: parking is nothing to them
            assert name != "local"
            transport.watch_output()
        else:
            assert rec.reply_threads[2] != rec.loop_thread
            send(rec, transport, 3, "echo", {"parked": True})  # written, but nobody watches
            await asyncio.sleep(0.3)
            assert 3 not in rec.replies
            transport.watch_output()  # what the host does before a call of its own
            await rec.until(lambda: 3 in rec.replies)
            assert rec.reply_threads[3] == rec.loop_thread
            # parked again, then held by the next caller without the loop seeing its reply
            assert await loop.run_in_executor(None, held_call, 4, True)
            assert await loop.run_in_executor(None, held_call, 5, False)
            assert rec.reply_threads[4] != rec.loop_thread
            assert rec.reply_threads[5] != rec.loop_thread
        send(rec, transport, 6, "echo", {"after": 1})
        await rec.until(lambda: 6 in rec.replies)
        assert rec.reply_threads[6] == rec.loop_thread
        transport.close_input()
        await rec.until(lambda: rec.exit is not None)  # seen while nobody watches output too

    asyncio.run(main())


def test_a_worker_killed_while_its_output_is_held_still_reports_its_exit() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder(loop)
        transport = get_backend("local").start(spec(), rec, loop)
        send(rec, transport, 1, "echo", {"warm": 1})
        await rec.until(lambda: 1 in rec.replies)

        def caller() -> int:
            assert transport.hold_output()
            try:
                send(rec, transport, 2, "sleep", {"seconds": 30})
                transport.signal(signal.SIGKILL)
                n = -1
                for _ in range(100):
                    n = transport.read_wait(0.2)
                    if n == 0:
                        break
                return n
            finally:
                transport.release_output()

        assert await loop.run_in_executor(None, caller) == 0  # end of output, seen at once
        await rec.until(lambda: rec.exit is not None)
        assert rec.exit is not None and rec.exit[0] == -signal.SIGKILL
        assert 2 not in rec.replies

    asyncio.run(main())


def test_settings_travel_in_the_environment_never_in_argv() -> None:
    argv, env = worker_command(spec(settings={"api_key": "sk-secret-123", "n": 1}))
    assert not any("sk-secret-123" in a for a in argv)
    assert "sk-secret-123" in env[SETTINGS_ENV]
    assert "sk-secret-123" not in repr(spec(settings={"api_key": "sk-secret-123"}))


def test_local_backend_reports_how_much_a_dead_worker_read() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder(loop)
        transport = get_backend("local").start(spec(), rec, loop)
        send(rec, transport, 1, "pid", {})
        await rec.until(lambda: 1 in rec.replies)
        read_so_far = transport.written
        transport.signal(signal.SIGSTOP)  # it cannot read what comes next...
        pid = transport.pid
        assert pid is not None

        def stopped() -> bool:  # ...once the stop has landed (it is asynchronous)
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "T"

        assert wait_until(stopped, 5)
        send(rec, transport, 2, "echo", {"never": "read"})
        transport.signal(signal.SIGKILL)
        await rec.until(lambda: rec.exit is not None)
        assert rec.exit is not None
        returncode, consumed = rec.exit
        assert returncode == -signal.SIGKILL
        assert consumed == read_so_far  # the second request was never read

    asyncio.run(main())


# ---------------------------------------------------------------- the same through a host
@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_a_whole_host_runs_on_the_backend(name: str) -> None:
    cfg = echo_cfg(pool_size=2, backend=name)
    with MLBridge(config(cfg)) as b:
        assert b.execute("echo", "echo", {"a": 1}) == {"a": 1}
        assert list(b.stream("echo", "stream", {"n": 3})) == [{"index": i} for i in range(3)]
        rid = b.create_resource("echo", "counter", {"start": 1})
        assert b.execute_resource("echo", rid, {})["value"] == 2
        # a timeout cancels in the worker, which stays
        with pytest.raises(errors.CallTimeoutError, match="stays in the pool"):
            b.execute("echo", "sleep", {"seconds": 5}, timeout=0.3)
        # a crash is explained and the worker replaced
        with pytest.raises(errors.WorkerCrashedError, match=r"SIGSEGV|segmentation"):
            b.execute("echo", "crash", {"mode": "segv"})
        assert wait_until(lambda: len(b.statistics()["pools"]["echo"]["workers"]) == 2, 15)
        assert b.execute_resource("echo", rid, {})["value"] == 3  # rebuilt from its state
        stats = b.statistics().pools["echo"]
        assert stats.backend == name and stats.restarts == 1


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_async_host_on_the_backend_with_callbacks(name: str) -> None:
    async def main() -> None:
        cfg_a = echo_cfg("a", pool_size=1, backend=name)
        cfg_b = echo_cfg("b", pool_size=1, backend=name)
        async with AsyncMLBridge(config(cfg_a, cfg_b)) as b:
            out = await b.execute(
                "a", "call_host", {"bridge": "b", "command": "echo", "args": {"v": 7}}
            )
            assert out == {"v": 7}
            results = await asyncio.gather(*(b.execute("a", "echo", {"i": i}) for i in range(20)))
            assert results == [{"i": i} for i in range(20)]

    asyncio.run(main())
