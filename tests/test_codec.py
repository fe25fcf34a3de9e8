"""Codecs (JSON, MessagePack, numpy over ext) and the wire error mapping, sans I/O."""

from __future__ import annotations

import sys
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlbridge import errors
from mlbridge._protocol.codec import (
    NDARRAY_EXT,
    JsonCodec,
    MsgpackCodec,
    NDArrayPayload,
    get_codec,
)
from mlbridge._protocol.messages import Failure
from mlbridge._protocol.wire_errors import (
    CODE_TO_ERROR,
    classify_exception,
    exception_from_failure,
    failure_from_exception,
)

# ------------------------------------------------------------------------------- strategies
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)


def _tree(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=6), st.dictionaries(_text, children, max_size=6)
        ),
        max_leaves=30,
    )


json_values = _tree(_scalars)
msgpack_values = _tree(st.one_of(_scalars, st.binary(max_size=64)))


# ------------------------------------------------------------------------------- round trips
@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_json_round_trip(value: Any) -> None:
    codec = JsonCodec()
    data = codec.encode(value)
    assert isinstance(data, bytes)
    data.decode("utf-8")  # JSON frames are UTF-8 text
    assert codec.decode(data) == value


@settings(max_examples=300, deadline=None)
@given(value=msgpack_values)
def test_msgpack_round_trip(value: Any) -> None:
    codec = MsgpackCodec()
    assert codec.decode(codec.encode(value)) == value


@settings(max_examples=100, deadline=None)
@given(value=json_values)
def test_json_and_msgpack_agree(value: Any) -> None:
    """A v1 payload means the same whichever codec carries it."""
    j, m = JsonCodec(), MsgpackCodec()
    assert m.decode(m.encode(value)) == j.decode(j.encode(value))


def test_msgpack_keeps_bytes_and_str_apart() -> None:
    codec = MsgpackCodec()
    out = codec.decode(codec.encode({"b": b"\xff\x00", "s": "\xff"}))
    assert out == {"b": b"\xff\x00", "s": "\xff"}
    assert type(out["b"]) is bytes
    assert type(out["s"]) is str


def test_msgpack_big_unsigned_int_and_int_keys() -> None:
    codec = MsgpackCodec()
    assert codec.decode(codec.encode({1: 2**64 - 1})) == {1: 2**64 - 1}


def test_tuples_and_sets_become_lists() -> None:
    for codec in (JsonCodec(), MsgpackCodec()):
        assert codec.decode(codec.encode({"t": (1, 2), "s": {3}})) == {"t": [1, 2], "s": [3]}


def test_get_codec() -> None:
    assert isinstance(get_codec("json"), JsonCodec)
    assert isinstance(get_codec("msgpack"), MsgpackCodec)
    with pytest.raises(ValueError, match="unknown codec 'cbor'"):
        get_codec("cbor")


@settings(max_examples=200, deadline=None)
@given(values=st.lists(msgpack_values, min_size=1, max_size=5))
def test_a_reused_encoder_writes_what_encode_writes(values: list[Any]) -> None:
    for codec in (JsonCodec(), MsgpackCodec()):
        encode = codec.encoder()
        for value in values:  # one encoder, many messages: nothing carries over between them
            if codec.name == "json" and _has_bytes(value):
                continue
            assert encode(value) == codec.encode(value)


def _has_bytes(value: Any) -> bool:
    if isinstance(value, bytes):
        return True
    if isinstance(value, dict):
        return any(_has_bytes(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_bytes(v) for v in value)
    return False


def test_a_reused_encoder_recovers_after_a_refused_message() -> None:
    encode = MsgpackCodec().encoder()
    with pytest.raises(errors.UnsupportedPayloadError, match="cannot be sent with MessagePack"):
        encode({"a": "x" * 1000, "b": object()})  # fails half way through the message
    with pytest.raises(errors.UnsupportedPayloadError, match="64-bit range"):
        encode({"n": 2**70})
    assert msgpack.unpackb(encode({"ok": True})) == {"ok": True}  # no leftover bytes
    big = {"blob": b"x" * (3 << 20)}  # past the size a reused packer keeps
    assert msgpack.unpackb(encode(big)) == big
    assert msgpack.unpackb(encode([1, 2])) == [1, 2]


# ------------------------------------------------------------------------------- numpy
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(24, dtype=np.int64).reshape(2, 3, 4),
        np.array([True, False, True]),
        np.array(3.5, dtype=np.float64),  # 0-d
        np.zeros((0, 5), dtype=np.uint8),  # empty
        np.arange(6, dtype=">i4"),  # big-endian
        np.array([1 + 2j, 3 - 4j], dtype=np.complex128),
        np.arange(20, dtype=np.float16).reshape(4, 5).T,  # not C-contiguous
    ],
    ids=["f32-2d", "i64-3d", "bool", "0d", "empty", "big-endian", "complex", "transposed"],
)
def test_ndarray_round_trip_keeps_dtype_and_shape(arr: np.ndarray) -> None:
    codec = MsgpackCodec()
    out = codec.decode(codec.encode({"a": arr}))["a"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_decoded_arrays_are_writable() -> None:
    codec = MsgpackCodec()
    out = codec.decode(codec.encode(np.zeros(4, dtype=np.int32)))
    out[1] = 5  # a handler may change what it was given
    assert out.tolist() == [0, 5, 0, 0]


def test_ndarray_travels_as_ext_type_with_raw_buffer_not_base64() -> None:
    arr = np.arange(1000, dtype=np.float64)
    data = MsgpackCodec().encode(arr)
    raw = arr.tobytes()
    assert raw in data  # the buffer itself, not a text encoding of it
    assert len(data) < len(raw) + 64  # base64 would be ~4/3 the size
    plain = msgpack.unpackb(data)  # no ext_hook: what is on the wire
    assert isinstance(plain, msgpack.ExtType)
    assert plain.code == NDARRAY_EXT


def test_numpy_scalars_become_plain_numbers() -> None:
    for codec in (JsonCodec(), MsgpackCodec()):
        out = codec.decode(codec.encode({"f": np.float32(1.5), "i": np.int16(7)}))
        assert out == {"f": 1.5, "i": 7}


def test_object_arrays_are_refused() -> None:
    with pytest.raises(errors.UnsupportedPayloadError, match="object-dtype"):
        MsgpackCodec().encode(np.array([{"a": 1}], dtype=object))


def test_ndarray_without_numpy_decodes_to_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    data = MsgpackCodec().encode(arr)
    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy -> ImportError
    out = MsgpackCodec().decode(data)
    assert out == NDArrayPayload("<i4", (2, 3), arr.tobytes())


# ------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "value",
    [b"raw", bytearray(b"raw"), memoryview(b"raw"), np.zeros(3)],
    ids=["bytes", "bytearray", "memoryview", "ndarray"],
)
def test_json_refuses_binary_and_suggests_msgpack(value: Any) -> None:
    with pytest.raises(errors.UnsupportedPayloadError) as info:
        JsonCodec().encode({"nested": [value]})
    message = str(info.value)
    assert "MessagePack" in message
    assert "msgpack" in message
    assert "base64" in message
    assert info.value.code == "unsupported_payload"


def test_json_refuses_arbitrary_objects_clearly() -> None:
    with pytest.raises(errors.UnsupportedPayloadError, match="not JSON-serialisable"):
        JsonCodec().encode({"x": object()})


def test_msgpack_refuses_arbitrary_objects_clearly() -> None:
    with pytest.raises(errors.UnsupportedPayloadError, match="cannot be sent with MessagePack"):
        MsgpackCodec().encode({"x": object()})


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe", b""])
def test_json_decode_errors(data: bytes) -> None:
    with pytest.raises(errors.DecodeError, match="not valid UTF-8 JSON"):
        JsonCodec().decode(data)


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", b""])
def test_msgpack_decode_errors(data: bytes) -> None:
    with pytest.raises(errors.DecodeError, match="not valid MessagePack"):
        MsgpackCodec().decode(data)


def test_msgpack_unknown_ext_type() -> None:
    data = msgpack.packb(msgpack.ExtType(42, b"x"))
    with pytest.raises(errors.DecodeError, match="unknown MessagePack ext type 42"):
        MsgpackCodec().decode(data)


# ------------------------------------------------------------------------------- wire errors
def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


@pytest.mark.parametrize("codec", [JsonCodec(), MsgpackCodec()], ids=["json", "msgpack"])
def test_failure_round_trip_keeps_code_type_and_traceback(codec: Any) -> None:
    exc = _raise(errors.ResourceNotFoundError("no program p1", resource_id="p1"))
    failure = failure_from_exception(9, exc)
    assert failure.error_code == "resource_not_found"
    wire = codec.decode(codec.encode(failure.to_wire()))
    assert wire["id"] == 9
    assert wire["success"] is False
    assert "timestamp" in wire
    back = exception_from_failure(Failure.from_wire(wire))
    assert type(back) is errors.ResourceNotFoundError
    assert isinstance(back, LookupError)
    assert str(back) == "no program p1"
    assert back.code == "resource_not_found"
    assert back.remote_type == "ResourceNotFoundError"
    assert back.details == {"resource_id": "p1"}
    assert isinstance(back.__cause__, errors.RemoteTraceback)
    assert "Traceback (most recent call last)" in str(back.__cause__)
    assert "no program p1" in back.__cause__.tb
    assert back.remote_traceback == failure.traceback


def test_foreign_exception_maps_to_remote_error_keeping_type_name() -> None:
    failure = failure_from_exception(3, _raise(KeyError("missing")))
    back = exception_from_failure(Failure.from_wire(failure.to_wire()), context="dspy:predict")
    assert type(back) is errors.RemoteError
    assert back.remote_type == "KeyError"
    assert str(back) == "dspy:predict: 'missing'"
    assert "KeyError" in str(back.__cause__)


def test_every_code_maps_back_to_its_class() -> None:
    for code, cls in CODE_TO_ERROR.items():
        back = exception_from_failure(Failure(1, "x", "T", code))
        assert type(back) is cls
        if code not in ("invalid_namespace",):
            assert back.code == code


def test_unknown_code_and_missing_traceback() -> None:
    back = exception_from_failure(Failure(1, "boom", "Weird", "some_future_code"))
    assert type(back) is errors.RemoteError
    assert back.__cause__ is None


def test_failure_without_traceback_when_asked() -> None:
    failure = failure_from_exception(1, _raise(ValueError("v")), with_traceback=False)
    assert failure.traceback is None
    assert "traceback" not in failure.to_wire()


def test_failure_message_falls_back_to_type_name() -> None:
    assert failure_from_exception(1, ValueError()).error == "ValueError"


def test_remote_error_re_raised_keeps_original_type_and_both_tracebacks() -> None:
    """A failure raised again in a worker (e.g. from a callback) reports the innermost type."""
    inner = exception_from_failure(
        Failure(1, "slow", "ReadTimeout", "timeout", traceback="inner tb text")
    )
    again = failure_from_exception(5, _raise(inner))
    assert again.error_type == "ReadTimeout"
    assert again.error_code == "timeout"
    assert again.traceback is not None
    assert "inner tb text" in again.traceback


def test_details_with_reserved_names_do_not_break_the_mapping() -> None:
    failure = Failure(1, "bad", "X", "invalid_request", details={"message": "m", "n": 2})
    back = exception_from_failure(failure)
    assert type(back) is errors.InvalidRequestError
    assert str(back) == "bad"
    assert back.details == {"message": "m", "n": 2}


def test_non_plain_details_are_dropped_from_the_wire() -> None:
    exc = errors.ModelError("oom", device="cuda:0", tensor=object())
    failure = failure_from_exception(1, exc)
    assert failure.details == {"device": "cuda:0"}
    JsonCodec().encode(failure.to_wire())  # encodable


# ------------------------------------------------------------------------------- classification
def _named(name: str, base: type[BaseException] = Exception) -> BaseException:
    return type(name, (base,), {})("x")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (_named("RateLimitError"), "rate_limit"),
        (_named("TooManyRequests"), "rate_limit"),
        (TimeoutError("t"), "timeout"),
        (_named("ReadTimeout"), "timeout"),
        (_named("AuthenticationError"), "invalid_configuration"),
        (_named("BadRequestError"), "invalid_request"),
        (_named("ContextWindowExceededError"), "model_error"),
        (_named("OutOfMemoryError", RuntimeError), "model_error"),
        (MemoryError(), "model_error"),
        (ValueError("v"), "unknown"),
        (errors.ResourceNotFoundError("r"), "resource_not_found"),
        (errors.CancelledCallError("c"), "cancelled"),
        (errors.UnsupportedPayloadError("u"), "unsupported_payload"),
    ],
)
def test_classify_exception(exc: BaseException, code: str) -> None:
    assert classify_exception(exc) == code


def test_classify_uses_the_base_classes_names() -> None:
    base = type("APITimeoutError", (Exception,), {})
    sub = type("ProviderSpecific", (base,), {})
    assert classify_exception(sub("x")) == "timeout"


def test_malformed_details_from_a_foreign_host_are_ignored() -> None:
    wire = {"id": 1, "success": False, "error": "e", "error_code": "model_error", "details": "x"}
    back = exception_from_failure(Failure.from_wire(wire))
    assert type(back) is errors.ModelError
    assert back.details == {}
