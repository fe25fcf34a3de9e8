"""The DSPy worker driven exactly as the original DSPex (Elixir) host drove its bridge.

The old host launched ``python3 dspy_bridge.py --mode pool-worker --worker-id <id>`` behind an
Erlang port with ``{packet, 4}``: 4-byte big-endian length, UTF-8 JSON, first request ``ping`` with
id 0, one request in flight, no ``hello``. These tests speak that protocol with nothing but
``struct`` and ``json`` (no mlbridge client code), check every reply shape of
shared/DSPEX_COMPAT.md, and run the same conversation from a real Erlang port when ``escript``
is installed (``.ci/run`` installs Debian's ``erlang-base``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("dspy")

import mlbridge.bridges.dspy_bridge as launcher
from dspy_helpers import dspy_env, dummy

pytestmark = pytest.mark.dspy

SCRIPT = launcher.__file__
SIGNATURE = {
    "name": "QuestionAnswer",
    "description": "Answer questions briefly.",
    "inputs": [{"name": "question", "description": "the question"}],
    "outputs": [{"name": "answer", "description": "a short answer"}],
}
OLD_REPLY_KEYS = {"id", "success", "timestamp"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class OldHost:
    """The DSPex side of the port: length-prefixed JSON over the child's stdin/stdout."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
            start_new_session=True,
        )
        self.next_id = 0

    def send_raw(self, payload: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(struct.pack(">I", len(payload)) + payload)
        self.proc.stdin.flush()

    def read(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        import select

        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        need = 4
        length = None
        while len(buf) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply from the bridge")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, need - len(buf))
                if not chunk:
                    raise EOFError("the bridge closed its output")
                buf += chunk
            if length is None and len(buf) >= 4:
                length = struct.unpack(">I", buf[:4])[0]
                buf = b""
                need = length
        reply = json.loads(buf.decode("utf-8"))
        assert isinstance(reply, dict)
        return reply

    def call(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = self.next_id
        self.next_id += 1
        msg = {"id": rid, "command": command, "args": args or {}, "timestamp": _now()}
        self.send_raw(json.dumps(msg).encode())
        reply = self.read()
        assert reply["id"] == rid, reply  # a reply whose id differs is an error for the old host
        assert set(reply) >= OLD_REPLY_KEYS
        assert isinstance(reply["success"], bool)
        if not reply["success"]:
            assert isinstance(reply["error"], str) and reply["error"]
            assert "result" not in reply
        return reply

    def ok(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.call(command, args)
        assert reply["success"] is True, reply
        result = reply["result"]
        assert isinstance(result, dict)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if s is not None and not s.closed:
                s.close()


@pytest.fixture
def old_host(tmp_path: Path) -> Iterator[OldHost]:
    h = OldHost(
        [sys.executable, SCRIPT, "--mode", "pool-worker", "--worker-id", "w1"], dspy_env(tmp_path)
    )
    yield h
    h.close()


def test_launch_line_ping_id_0_and_every_reply_shape(old_host: OldHost) -> None:
    h = old_host
    ping = h.ok("ping", {"initialization": True, "worker_id": "w1", "health_check": False})
    assert h.next_id == 1  # that was id 0
    assert ping["status"] == "ok"
    assert ping["dspy_available"] is True
    assert ping["mode"] == "pool-worker"
    assert ping["worker_id"] == "w1"
    assert isinstance(ping["uptime"], float) and ping["uptime"] >= 0
    assert isinstance(ping["timestamp"], float)

    configured = h.ok(
        "configure_lm", {"model": "gemini-1.5-flash", "api_key": "test-key", "provider": "google"}
    )
    assert {k: configured[k] for k in ("status", "model", "provider", "temperature")} == {
        "status": "configured",
        "model": "gemini-1.5-flash",
        "provider": "google",
        "temperature": 0.7,
    }
    assert configured["lm"]["model"] == "gemini/gemini-1.5-flash"
    assert "test-key" not in json.dumps(configured)
    # Programs then run on a scripted model (a BaseLM class, as new hosts may configure).
    h.ok("configure_lm", dummy({"capital of France": {"answer": "Paris"}}))

    created = h.ok(
        "create_program",
        {"id": "qa", "signature": SIGNATURE, "program_type": "predict", "session_id": "s1"},
    )
    assert created["program_id"] == "qa"
    assert created["status"] == "created"
    assert created["signature"] == SIGNATURE
    assert created["program_type"] == "predict"
    assert created["signature_class"] == "QuestionAnswer"
    assert created["field_mapping"] == {"question": "question", "answer": "answer"}
    assert created["signature_def"]["instructions"] == "Answer questions briefly."

    # The same id in another session is another program, as with the old pool workers.
    h.ok("create_program", {"id": "qa", "signature": SIGNATURE, "session_id": "s2"})
    dup = h.call("create_program", {"id": "qa", "signature": SIGNATURE, "session_id": "s1"})
    assert dup["success"] is False and "already exists" in dup["error"]

    executed = h.ok(
        "execute_program",
        {
            "program_id": "qa",
            "inputs": {"question": "What is the capital of France?"},
            "session_id": "s1",
        },
    )
    assert executed["program_id"] == "qa"
    assert executed["outputs"] == {"answer": "Paris"}
    assert isinstance(executed["execution_time"], float) and executed["execution_time"] < 10

    listed = h.ok("list_programs", {"session_id": "s1"})
    assert listed["total_count"] == 1
    (row,) = listed["programs"]
    assert row["id"] == "qa"
    assert row["signature"] == SIGNATURE
    assert row["execution_count"] == 1
    assert isinstance(row["created_at"], float) and isinstance(row["last_executed"], float)
    assert h.ok("list_programs")["total_count"] == 2

    info = h.ok("get_program_info", {"program_id": "qa", "session_id": "s1"})
    assert {k: info[k] for k in ("program_id", "signature", "execution_count")} == {
        "program_id": "qa",
        "signature": SIGNATURE,
        "execution_count": 1,
    }
    assert info["created_at"] == row["created_at"]
    assert info["last_executed"] == row["last_executed"]

    stats = h.ok("get_stats")
    assert stats["programs_count"] == 2
    assert stats["command_count"] >= 8
    assert stats["error_count"] >= 1  # the duplicate create
    assert stats["dspy_available"] is True
    assert set(stats["memory_usage"]) >= {"rss", "vms", "percent"}
    assert stats["memory_usage"]["rss"] > 10_000_000
    assert isinstance(stats["uptime"], float)

    assert h.ok("delete_program", {"program_id": "qa", "session_id": "s2"}) == {
        "program_id": "qa",
        "status": "deleted",
    }
    assert h.ok("cleanup_session", {"session_id": "s1"}) == {
        "status": "cleaned",
        "session_id": "s1",
        "programs_removed": 1,
    }
    h.ok("create_program", {"id": "a", "signature": SIGNATURE, "session_id": "s3"})
    cleaned = h.ok("cleanup")
    assert cleaned["status"] == "cleaned" and cleaned["programs_removed"] == 1
    h.ok("create_program", {"id": "b", "signature": SIGNATURE})
    reset = h.ok("reset_state")
    assert reset["status"] == "reset"
    assert reset["programs_cleared"] == 1
    assert reset["commands_reset"] >= 15
    assert reset["errors_reset"] >= 1
    # Counting starts again: only the reset itself has been counted since.
    assert h.ok("get_stats")["command_count"] == 1

    bye = h.ok("shutdown", {"worker_id": "w1"})
    assert bye["status"] == "shutting_down" and bye["worker_id"] == "w1"
    assert h.proc.wait(5) == 0


def test_failures_are_failure_replies_never_errors_inside_success(old_host: OldHost) -> None:
    h = old_host
    h.ok("ping")
    for command, args, fragment in [
        ("configure_lm", {"api_key": "k"}, "model is required"),
        (
            "configure_lm",
            {"model": "x", "provider": "google", "temperature": "warm"},
            "temperature",
        ),
        ("create_program", {"id": "p", "signature": {"inputs": [], "outputs": []}}, "output"),
        ("create_program", {"signature": SIGNATURE}, "'id'"),
        ("execute_program", {"program_id": "missing", "inputs": {}}, "missing"),
        ("get_program_info", {"program_id": "missing"}, "missing"),
        ("delete_program", {"program_id": "missing"}, "missing"),
        ("no_such_command", {}, "no_such_command"),
        ("other:ping", {}, "namespace"),
    ]:
        reply = h.call(command, args)
        assert reply["success"] is False, (command, reply)
        assert fragment in reply["error"], (command, fragment, reply["error"])
    # The failed create left nothing behind (no silent question -> answer fallback).
    assert h.ok("list_programs")["total_count"] == 0
    # Namespaced forms of the old commands work too.
    assert h.ok("dspy:ping")["status"] == "ok"
    assert h.ok("common:ping")["status"] == "ok"


def test_a_message_without_id_or_command_gets_a_failure_not_silence(old_host: OldHost) -> None:
    h = old_host
    h.send_raw(json.dumps({"command": "ping", "args": {}}).encode())
    reply = h.read()
    assert reply["success"] is False and reply["id"] == 0 and "id" in reply["error"]
    h.send_raw(json.dumps({"id": 41, "args": {}}).encode())
    reply = h.read()
    assert reply["success"] is False and reply["id"] == 41 and "command" in reply["error"]
    h.send_raw(b"{not json")
    reply = h.read()
    assert reply["success"] is False and reply["id"] == 0
    h.next_id = 42
    assert h.ok("ping")["status"] == "ok"


def test_the_bridge_exits_0_when_the_port_closes(old_host: OldHost) -> None:
    h = old_host
    h.ok("ping")
    assert h.proc.stdin is not None
    h.proc.stdin.close()
    t0 = time.monotonic()
    assert h.proc.wait(5) == 0
    assert time.monotonic() - t0 < 2.0


def test_standalone_mode_and_module_launch(tmp_path: Path) -> None:
    h = OldHost(
        [sys.executable, "-m", "mlbridge.bridges.dspy_bridge", "--worker-id", "solo"],
        dspy_env(tmp_path),
    )
    try:
        ping = h.ok("ping")
        assert ping["mode"] == "standalone" and ping["worker_id"] == "solo"
        h.ok("configure_lm", dummy([{"answer": "4"}]))
        h.ok("create_program", {"id": "math", "signature": "question -> answer"})
        out = h.ok("execute_program", {"program_id": "math", "inputs": {"question": "2+2"}})
        assert out["outputs"] == {"answer": "4"}
    finally:
        h.close()


def test_mlbridge_start_bridge_accepts_the_same_script() -> None:
    from mlbridge import MLBridge, MLBridgeConfig

    # The workers inherit this process's DSPY_CACHEDIR (a temporary folder: dspy_helpers).
    with MLBridge(MLBridgeConfig(bridges={}, default_bridge=None), env_overrides=False) as b:
        b.start_bridge("dspex", python_script=SCRIPT)
        assert b.execute("dspex", "ping")["dspy_available"] is True
        b.execute("dspex", "configure_lm", dummy([{"answer": "from the script"}]))
        rid = b.create_resource("dspex", "program", {"signature": "question -> answer"})
        out = b.execute_resource("dspex", rid, {"question": "?"})
        assert out["outputs"] == {"answer": "from the script"}


ESCRIPT = r"""#!/usr/bin/env escript
%% The DSPex side, as Elixir ran it: an Erlang port with {packet, 4}.
main([Python, Script, RequestsFile]) ->
    {ok, Data} = file:read_file(RequestsFile),
    Lines = [L || L <- binary:split(Data, <<"\n">>, [global]), L =/= <<>>],
    Port = open_port({spawn_executable, Python},
                     [{args, [Script, "--mode", "pool-worker", "--worker-id", "erl_w1"]},
                      {packet, 4}, binary, exit_status, use_stdio]),
    lists:foreach(
      fun(Line) ->
          true = port_command(Port, Line),
          receive
              {Port, {data, Reply}} -> io:put_chars([Reply, "\n"]);
              {Port, {exit_status, S}} -> io:format("EXIT ~p~n", [S]), halt(0)
          after 60000 -> io:format("TIMEOUT~n"), halt(1)
          end
      end, Lines),
    receive
        {Port, {exit_status, Status}} -> io:format("EXIT ~p~n", [Status])
    after 10000 -> io:format("NOEXIT~n")
    end.
"""


@pytest.mark.skipif(shutil.which("escript") is None, reason="needs escript (Debian erlang-base)")
def test_a_real_erlang_port_drives_the_bridge(tmp_path: Path) -> None:
    script = tmp_path / "dspex_host.escript"
    script.write_text(ESCRIPT)
    requests = [
        {"id": 0, "command": "ping", "args": {}},
        {"id": 1, "command": "configure_lm", "args": dummy([{"answer": "Paris"}])},
        {
            "id": 2,
            "command": "create_program",
            "args": {"id": "qa", "signature": SIGNATURE, "session_id": "s"},
        },
        {
            "id": 3,
            "command": "execute_program",
            "args": {
                "program_id": "qa",
                "inputs": {"question": "Capital of France?"},
                "session_id": "s",
            },
        },
        {"id": 4, "command": "execute_program", "args": {"program_id": "nope", "inputs": {}}},
        {"id": 5, "command": "list_programs", "args": {"session_id": "s"}},
        {"id": 6, "command": "shutdown", "args": {"worker_id": "erl_w1"}},
    ]
    reqfile = tmp_path / "requests.jsonl"
    reqfile.write_text("".join(json.dumps({**r, "timestamp": _now()}) + "\n" for r in requests))
    proc = subprocess.run(
        ["escript", str(script), sys.executable, SCRIPT, str(reqfile)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **dspy_env(tmp_path)},
    )
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "EXIT 0", proc.stdout + proc.stderr
    replies = [json.loads(line) for line in lines[:-1]]
    assert [r["id"] for r in replies] == [0, 1, 2, 3, 4, 5, 6]
    assert all(set(r) >= OLD_REPLY_KEYS for r in replies)
    assert replies[0]["result"]["worker_id"] == "erl_w1"
    assert replies[0]["result"]["mode"] == "pool-worker"
    assert replies[2]["result"]["program_id"] == "qa"
    assert replies[3]["result"]["outputs"] == {"answer": "Paris"}
    assert replies[4]["success"] is False and "nope" in replies[4]["error"]
    assert replies[5]["result"]["total_count"] == 1
    assert replies[6]["result"]["status"] == "shutting_down"
