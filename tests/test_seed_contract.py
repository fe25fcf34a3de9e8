"""Bridges written to the original (seed) design run unchanged beside today's style.

The original contract: ``BaseBridge(mode, worker_id)``, ``_register_handlers()`` returning a dict
of command -> handler that includes ``self.ping``/``get_info``/``get_stats``/``cleanup``, no
``name`` (the namespace is ``get_framework_info()["name"]``), ``self.stats``, and a script that
ends in ``ProbeBridge().run()``. Every test drives real worker processes over real pipes: the
host (``start_bridge(python_script=...)``), ``python -m mlbridge.worker file.py``, and the script
launched by itself the way the original host launched bridges.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from host_helpers import config, echo_cfg
from mlbridge import errors
from mlbridge._api import MLBridge
from mlbridge._protocol.exit_codes import BOOT_ERROR_MARKER, EXIT_FRAMEWORK_INIT_FAILED
from mlbridge._protocol.framing import FrameDecoder, encode_frame
from worker_helpers import Spawner

# Written as a bridge author following the original design would: typing.Dict, positional
# super().__init__, no `name`, a handler dict with the four common methods, overrides of
# get_stats and cleanup, and the `if __name__ == "__main__"` launcher.
SEED_BRIDGE = '''
"""An original-design bridge: the framework is a dict."""
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from mlbridge.bridges.base import BaseBridge


class ProbeBridge(BaseBridge):
    def __init__(self, mode: str = "standalone", worker_id: Optional[str] = None):
        super().__init__(mode, worker_id)
        self.items: Dict[str, Any] = {}
        self.marker = Path(__file__).with_suffix(".cleanups")

    def _initialize_framework(self) -> None:
        print("probe: stray print while initialising")  # must not corrupt the frames
        os.write(1, b"probe: raw write to fd 1\\n")
        self.ready = True

    def _register_handlers(self) -> Dict[str, Callable]:
        return {
            "ping": self.ping,
            "get_info": self.get_info,
            "get_stats": self.get_stats,
            "cleanup": self.cleanup,
            "store": self.store,
            "fetch": self.fetch,
            "boom": self.boom,
            "nap": self.nap,
        }

    def get_framework_info(self) -> Dict[str, Any]:
        return {"name": "probe", "version": "0.1", "capabilities": ["store", "fetch"]}

    def store(self, args: Dict[str, Any]) -> Dict[str, Any]:
        self.items[args["key"]] = args["value"]
        return {"stored": args["key"]}

    def fetch(self, args: Dict[str, Any]) -> Dict[str, Any]:
        return {"value": self.items[args["key"]]}  # a missing key is a KeyError

    def boom(self, args: Dict[str, Any]) -> Dict[str, Any]:
        raise ValueError("probe exploded: " + args.get("why", "no reason"))

    def nap(self, args: Dict[str, Any]) -> Dict[str, Any]:
        time.sleep(float(args.get("seconds", 1)))
        return {"napped": True}

    def get_stats(self, args: Dict[str, Any]) -> Dict[str, Any]:
        return {"probe": True, "stored": len(self.items), **self.stats}

    def cleanup(self, args: Dict[str, Any]) -> Dict[str, Any]:
        self.items.clear()
        with self.marker.open("a") as f:
            f.write("cleanup %d\\n" % os.getpid())
        return {"status": "cleaned"}


if __name__ == "__main__":
    ProbeBridge().run()
'''

# Today's style and the original style in one class: register_handler plus a returned dict.
MIXED_BRIDGE = """
from mlbridge.bridges.base import BaseBridge


class MixedBridge(BaseBridge):
    name = "mixed"

    def _register_handlers(self):
        self.register_handler("new_style", lambda a: {"style": "register_handler"})
        return {"old_style": lambda a: {"style": "dict"}, "stats_view": self.stats_view}

    def stats_view(self, args):
        return {"stats": dict(self.stats), "statistics": self.statistics()}
"""


def _write(tmp_path: Path, text: str, name: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def probe(tmp_path: Path) -> Path:
    return _write(tmp_path, SEED_BRIDGE, "probe_bridge.py")


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


def _cleanups(script: Path) -> list[str]:
    marker = script.with_suffix(".cleanups")
    return marker.read_text().splitlines() if marker.exists() else []


class ScriptWorker:
    """A bridge script launched by itself (``python probe_bridge.py ...``), frame by frame."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._decoder = FrameDecoder(1 << 31)
        self._frames: list[Any] = []
        self._ids = itertools.count(1)

    def send(self, msg: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_frame(json.dumps(msg).encode()))
        self.proc.stdin.flush()

    def recv(self, timeout: float = 10.0) -> Any:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while not self._frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no frame from the script within {timeout}s")
            if not select.select([fd], [], [], left)[0]:
                continue
            data = os.read(fd, 1 << 20)
            if not data:
                raise EOFError(f"the script closed its output (exit {self.proc.poll()})")
            for frame in self._decoder.feed(data):
                assert isinstance(frame, bytes), frame
                self._frames.append(json.loads(frame))
        return self._frames.pop(0)

    def ask(self, command: str, args: dict[str, Any] | None = None) -> Any:
        rid = next(self._ids)
        self.send({"id": rid, "command": command, "args": args or {}})
        reply = self.recv()
        assert reply["id"] == rid, reply
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def script_worker() -> Iterator[Any]:
    started: list[ScriptWorker] = []

    def start(*argv: str) -> ScriptWorker:
        w = ScriptWorker(*argv)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


# ------------------------------------------------------------------------- (c) as a script
def test_script_launched_directly_speaks_the_original_protocol(
    probe: Path, script_worker: Any
) -> None:
    w = script_worker(str(probe), "--mode", "pool-worker", "--worker-id", "w1")
    w.send({"id": 0, "command": "ping", "args": {}})
    ping = w.recv()
    assert ping["id"] == 0 and ping["success"] is True
    assert ping["result"]["status"] == "ok"
    assert ping["result"]["worker_id"] == "w1"
    assert ping["result"]["mode"] == "pool-worker"
    assert ping["result"]["framework"] == "probe"  # from get_framework_info, not set as name

    assert w.ask("probe:store", {"key": "k", "value": [1, 2]})["result"] == {"stored": "k"}
    assert w.ask("fetch", {"key": "k"})["result"] == {"value": [1, 2]}
    assert w.ask("common:ping")["result"]["worker_id"] == "w1"
    info = w.ask("common:get_info")["result"]
    assert info["framework"] == {
        "name": "probe",
        "version": "0.1",
        "capabilities": ["store", "fetch"],
    }
    assert info["bridge"] == "probe"

    foreign = w.ask("dspy:store", {"key": "x", "value": 1})
    assert foreign["success"] is False
    assert foreign["error_code"] == "unknown_command"
    assert "'dspy'" in foreign["error"] and "'probe:<cmd>'" in foreign["error"]

    boom = w.ask("boom", {"why": "on purpose"})
    assert boom["success"] is False
    assert boom["error_type"] == "ValueError"
    assert boom["error"] == "probe exploded: on purpose"
    missing = w.ask("probe:fetch", {"key": "nope"})
    assert missing["success"] is False and missing["error_type"] == "KeyError"

    stats = w.ask("get_stats")["result"]
    assert stats["probe"] is True and stats["stored"] == 1  # the subclass's own reply
    # store, fetch, get_info, dspy:store (refused before it ran), boom, fetch: ping is not
    # counted (control thread), nor a command that never reached a handler.
    assert stats["requests_processed"] == 5
    assert stats["errors"] == 2
    datetime.fromisoformat(stats["start_time"])

    assert w.ask("cleanup")["result"] == {"status": "cleaned"}
    assert w.ask("fetch", {"key": "k"})["error_type"] == "KeyError"  # the override cleared it
    assert _cleanups(probe) == [f"cleanup {w.proc.pid}"]

    assert w.proc.stdin is not None
    w.proc.stdin.close()
    assert w.proc.wait(5) == 0
    assert _cleanups(probe) == [f"cleanup {w.proc.pid}"] * 2  # and once more at shutdown
    assert w.proc.stderr is not None
    err = w.proc.stderr.read().decode()
    assert "probe: stray print while initialising" in err
    assert "probe: raw write to fd 1" in err


def test_script_ping_is_answered_while_a_long_call_runs(probe: Path, script_worker: Any) -> None:
    w = script_worker(str(probe))
    assert w.ask("ping")["result"]["mode"] == "standalone"  # the original default
    w.send({"id": 10, "command": "nap", "args": {"seconds": 1.5}})
    time.sleep(0.2)
    t0 = time.monotonic()
    w.send({"id": 11, "command": "ping", "args": {}})
    first = w.recv(5)
    assert first["id"] == 11 and first["result"]["status"] == "ok"
    assert time.monotonic() - t0 < 0.5  # answered by the control thread, not after the nap
    nap = w.recv(5)
    assert nap["id"] == 10 and nap["result"] == {"napped": True}


def test_script_exits_0_at_end_of_input_and_speaks_hello_v2(
    probe: Path, script_worker: Any
) -> None:
    w = script_worker(str(probe), "--worker-id", "solo")
    hello = w.ask("hello", {"protocol_version": 2, "codecs": ["json"]})["result"]
    assert hello["bridge"] == "probe" and hello["worker_id"] == "solo"
    assert "streaming" in hello["capabilities"]
    assert w.proc.stdin is not None
    w.proc.stdin.close()
    assert w.proc.wait(5) == 0


def test_script_with_a_bad_option_is_a_usage_error(probe: Path, script_worker: Any) -> None:
    w = script_worker(str(probe), "--mode", "bogus")
    assert w.proc.wait(10) == 64
    assert w.proc.stderr is not None
    assert "--mode" in w.proc.stderr.read().decode()


# ------------------------------------------------------------- (b) python -m mlbridge.worker
def test_seed_bridge_through_the_worker_module(probe: Path, spawn: Spawner) -> None:
    w = spawn(str(probe), "--mode", "pool-worker", "--worker-id", "m1")
    w.send({"id": 0, "command": "ping"})
    ping = w.recv()
    assert ping["id"] == 0 and ping["result"]["worker_id"] == "m1"
    assert ping["result"]["framework"] == "probe"
    hello = w.hello("msgpack")
    assert hello["bridge"] == "probe"
    assert w.request("probe:store", {"key": "a", "value": b"\x00bin"}) == {"stored": "a"}
    assert w.request("common:fetch", {"key": "a"}) == {"value": b"\x00bin"}
    with pytest.raises(errors.UnknownCommandError, match="'langchain'"):
        w.request("langchain:fetch", {"key": "a"})
    with pytest.raises(errors.BridgeError, match="probe exploded: x") as info:
        w.request("boom", {"why": "x"})
    assert info.value.remote_type == "ValueError"
    stats = w.request("get_stats")
    assert stats["probe"] is True and stats["requests_processed"] == 3 and stats["errors"] == 1
    assert w.request("cleanup") == {"status": "cleaned"}
    w.close_input()
    assert w.wait() == 0
    assert _cleanups(probe) == [f"cleanup {w.proc.pid}"] * 2  # the command, then shutdown


def test_mixed_styles_and_stats_in_step(tmp_path: Path, spawn: Spawner) -> None:
    w = spawn(str(_write(tmp_path, MIXED_BRIDGE, "mixed_bridge.py")))
    assert w.request("new_style") == {"style": "register_handler"}
    assert w.request("mixed:old_style") == {"style": "dict"}
    with pytest.raises(errors.BridgeError):
        w.request("mixed:absent")
    view = w.request("stats_view")
    stats, snapshot = view["stats"], view["statistics"]
    assert stats["requests_processed"] == snapshot["requests_processed"] == 2
    assert stats["errors"] == snapshot["errors"] == snapshot["error_count"] == 0
    assert stats["start_time"] == snapshot["started_at"]
    started = datetime.fromisoformat(stats["start_time"])
    assert started.utcoffset() is not None
    assert abs(started.timestamp() - snapshot["start_time"]) < 1e-3
    assert w.request("get_stats")["requests_processed"] == 3  # default get_stats: statistics()
    assert w.request("ping")["framework"] == "mixed"


# ------------------------------------------------------------------------------ boot errors
BAD_BRIDGES = {
    "not_callable": (
        "class Bad(BaseBridge):\n"
        "    def _register_handlers(self):\n"
        "        return {'ping': self.ping, 'predict': 'not a function'}\n"
        "    def get_framework_info(self):\n"
        "        return {'name': 'bad'}\n",
        "'predict'",
    ),
    "namespaced": (
        "class Bad(BaseBridge):\n"
        "    def _register_handlers(self):\n"
        "        return {'bad:predict': lambda a: a}\n"
        "    def get_framework_info(self):\n"
        "        return {'name': 'bad'}\n",
        "'bad:predict'",
    ),
    "names_differ": (
        "class Bad(BaseBridge):\n"
        "    name = 'alpha'\n"
        "    def get_framework_info(self):\n"
        "        return {'name': 'beta'}\n",
        "'alpha'",
    ),
    "not_a_mapping": (
        "class Bad(BaseBridge):\n"
        "    def _register_handlers(self):\n"
        "        return [('predict', print)]\n",
        "_register_handlers() returned list",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BRIDGES))
def test_bad_definitions_are_boot_errors_naming_the_culprit(
    case: str, tmp_path: Path, spawn: Spawner
) -> None:
    body, named = BAD_BRIDGES[case]
    script = _write(tmp_path, "from mlbridge.bridges.base import BaseBridge\n" + body, "bad.py")
    w = spawn(str(script))
    assert w.wait(10) == EXIT_FRAMEWORK_INIT_FAILED
    err = w.stderr_text()
    line = next(x for x in err.splitlines() if x.startswith(BOOT_ERROR_MARKER))
    info = json.loads(line[len(BOOT_ERROR_MARKER) :])
    assert named in info["error"], info["error"]
    assert info["error_code"] == "invalid_configuration"


# --------------------------------------------------------------------- (a) through the host
def test_seed_bridge_through_start_bridge_beside_todays_style(probe: Path) -> None:
    with MLBridge(config(echo_cfg())) as b:
        cfg = b.start_bridge("probe", python_script=str(probe), pool_size=2)
        assert cfg.pool_size == 2
        assert b.execute("probe", "store", {"key": "k", "value": 42}) == {"stored": "k"}
        info = b.get_framework_info("probe")
        assert info["framework"]["name"] == "probe" and info["bridge"] == "probe"
        with pytest.raises(errors.BridgeError, match="probe exploded: host") as exc:
            b.execute("probe", "boom", {"why": "host"})
        assert exc.value.remote_type == "ValueError"
        stats = b.execute("probe", "get_stats")
        assert stats["probe"] is True and "requests_processed" in stats
        # the original bridge and an echo (register_handler style) bridge in one host
        assert b.execute("echo", "echo", {"same": "run"}) == {"same": "run"}
        pids = {w["pid"] for w in b.statistics()["pools"]["probe"]["workers"]}
        assert len(pids) == 2
    # each worker ran the overridden cleanup when the host shut it down
    assert sorted(_cleanups(probe)) == sorted(f"cleanup {pid}" for pid in pids)
