"""Integers beyond 64 bits: the error says so (issue 9, item 8), instead of "int cannot be sent"."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from host_helpers import config, echo_cfg
from mlbridge import errors
from mlbridge._api import MLBridge
from mlbridge._protocol.codec import JsonCodec, MsgpackCodec
from worker_helpers import Spawner

RANGE = "is out of the 64-bit range MessagePack can carry (-2**63 to 2**64-1)"


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    s = Spawner()
    yield s
    s.close_all()


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (2**70, "the integer 1180591620717411303424"),
        ({"deep": [1, -(2**64)]}, "the integer -18446744073709551616"),
        (-(2**63) - 1, "the integer -9223372036854775809"),
        (2**5000, "a 5001-bit integer"),  # too long to print whole
    ],
    ids=["2**70", "nested -2**64", "-2**63-1", "2**5000"],
)
def test_msgpack_names_the_range(value: object, shown: str) -> None:
    with pytest.raises(errors.UnsupportedPayloadError) as info:
        MsgpackCodec().encode(value)
    message = str(info.value)
    assert message.startswith(f"{shown} {RANGE}")
    assert "send it as a string" in message
    assert "cannot be sent" not in message


def test_the_edges_of_the_range_still_travel() -> None:
    codec = MsgpackCodec()
    for n in (2**64 - 1, -(2**63), 0, True):
        assert codec.decode(codec.encode({"n": n})) == {"n": n}


def test_json_names_the_range_too() -> None:
    with pytest.raises(errors.UnsupportedPayloadError, match="out of the 64-bit range JSON"):
        JsonCodec().encode({"n": 2**70})


def test_a_worker_reply_with_2_pow_70(spawn: Spawner) -> None:
    w = spawn()
    w.hello("msgpack")
    assert w.request("pow2", {"exp": 63}) == 2**63
    reply = w.request("pow2", {"exp": 70}, raw=True)
    assert reply["success"] is False
    assert reply["error_code"] == "unsupported_payload"
    assert reply["error"] == (
        f"the reply could not be encoded: the integer {2**70} {RANGE}; send it as a string "
        "(str(n)), or as a float if precision may go"
    )
    assert w.request("pow2", {"exp": 3}) == 8  # still serving


def test_through_the_host_both_ways() -> None:
    with MLBridge(config(echo_cfg())) as b:
        with pytest.raises(errors.UnsupportedPayloadError, match="64-bit range"):
            b.execute("echo", "echo", {"n": 2**70})
        with pytest.raises(errors.UnsupportedPayloadError, match=r"integer 1180591620717411303424"):
            b.execute("echo", "pow2", {"exp": 70})
        assert b.execute("echo", "pow2", {"exp": 10}) == 1024
