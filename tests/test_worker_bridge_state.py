"""Bridge-wide state, worker side: ``set_bridge_state`` reports, ``apply_bridge_state`` replays.

Real workers, raw frames. The host part of the seam (recording the state and replaying it to
every current, replacement and overflow worker) sends the built-in ``apply_bridge_state``
command; here we send it by hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mlbridge import errors
from worker_helpers import Spawner

# A bridge that acts on its state (as DSPy's bridge configures its LM) through the hook.
STATEFUL_BRIDGE = """
from mlbridge.bridges.base import BaseBridge


class LmBridge(BaseBridge):
    name = "lm"

    def _initialize_framework(self):
        self.applied = []
        self.lm = None

    def apply_bridge_state(self, key, value):
        self.applied.append(key)
        if key == "lm":
            self.lm = "LM(" + value["model"] + ")"
        super().apply_bridge_state(key, value)

    def _register_handlers(self):
        self.register_handler("configure", self.configure)
        self.register_handler("configure_streaming", self.configure_streaming)
        self.register_handler("show", lambda a: {"lm": self.lm, "applied": self.applied,
                                                  "state": self.bridge_state})

    def configure(self, args):
        self.set_bridge_state("lm", {"model": args["model"]})
        return {"configured": self.lm}

    def configure_streaming(self, args):
        yield {"step": "before"}
        self.set_bridge_state("lm", {"model": args["model"]})
        yield {"step": "after"}
        return {"configured": self.lm}
"""


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


@pytest.fixture
def lm_bridge(tmp_path: Path) -> str:
    path = tmp_path / "lm_bridge.py"
    path.write_text(STATEFUL_BRIDGE)
    return str(path)


def test_hello_announces_bridge_state(spawn: Spawner) -> None:
    w = spawn()
    assert "bridge_state" in w.hello("msgpack")["capabilities"]


def test_set_bridge_state_applies_here_and_rides_on_the_success_reply(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    state = {"lm": {"model": "m1", "temperature": 0.5}, "cache": False}
    reply = w.request("set_bridge_state", {"state": state}, raw=True)
    assert reply["success"] is True
    assert reply["result"] == {"set": ["lm", "cache"]}
    assert reply["bridge_state"] == state
    assert list(reply["bridge_state"]) == ["lm", "cache"]  # in the order they were set
    assert w.request("bridge_state") == state
    # A call that sets nothing carries no bridge_state key.
    plain = w.request("echo", {"x": 1}, raw=True)
    assert "bridge_state" not in plain


def test_a_failing_call_reports_no_state(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    reply = w.request("set_bridge_state", {"state": {"k": 1}, "fail": True}, raw=True)
    assert reply["success"] is False and reply["error_code"] == "invalid_request"
    assert "bridge_state" not in reply


def test_v1_host_never_sees_the_key(spawn: Spawner) -> None:
    w = spawn()  # no hello: JSON v1
    reply = w.request("set_bridge_state", {"state": {"k": "v"}}, raw=True)
    assert set(reply) == {"id", "success", "result", "timestamp"}
    assert w.request("bridge_state") == {"k": "v"}  # still applied in this worker


def test_apply_bridge_state_replays_in_order_without_reporting_back(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    reply = w.request("apply_bridge_state", {"state": {"b": 2, "a": [1, 2]}}, raw=True)
    assert reply["result"] == {"applied": ["b", "a"]}
    assert "bridge_state" not in reply  # the host already has it
    assert w.request("common:apply_bridge_state", {"state": {"b": 3}}) == {"applied": ["b"]}
    assert w.request("bridge_state") == {"b": 3, "a": [1, 2]}
    with pytest.raises(errors.InvalidRequestError, match="'state' must be an object"):
        w.request("apply_bridge_state", {"state": [["a", 1]]})
    with pytest.raises(errors.InvalidRequestError, match="must be an object"):
        w.request("apply_bridge_state", {})


def test_the_hook_runs_for_both_paths_and_in_streams(lm_bridge: str, spawn: Spawner) -> None:
    w = spawn(lm_bridge)
    w.hello("msgpack")
    reply = w.request("configure", {"model": "tiny"}, raw=True)
    assert reply["result"] == {"configured": "LM(tiny)"}
    assert reply["bridge_state"] == {"lm": {"model": "tiny"}}

    # A fresh worker of the same pool gets the recorded state replayed by the host.
    other = spawn(lm_bridge)
    other.hello("msgpack")
    assert other.request("apply_bridge_state", {"state": reply["bridge_state"]}) == {
        "applied": ["lm"]
    }
    assert other.request("show") == {
        "lm": "LM(tiny)",
        "applied": ["lm"],
        "state": {"lm": {"model": "tiny"}},
    }

    # Set during a stream: reported with the final reply, after the chunks.
    w.send({"id": 40, "command": "configure_streaming", "args": {"model": "big"}, "stream": True})
    frames = [w.recv(), w.recv(), w.recv()]
    assert [f.get("chunk") for f in frames[:2]] == [{"step": "before"}, {"step": "after"}]
    assert frames[2]["result"] == {"configured": "LM(big)"}
    assert frames[2]["bridge_state"] == {"lm": {"model": "big"}}
    assert w.request("show")["applied"] == ["lm", "lm"]
