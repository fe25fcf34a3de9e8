"""Payload codecs: JSON (orjson) and MessagePack, behind one interface.

JSON is the v1 (DSPEx) codec: UTF-8 text, no binary. Bytes or arrays given to it are refused
with :class:`~mlbridge.errors.UnsupportedPayloadError` naming the fix (negotiate msgpack), never
base64-encoded behind the caller's back.

MessagePack carries ``bytes`` as bin and numpy arrays as ext type 1 (a small header with dtype
and shape, then the raw buffer). numpy is imported only when an array is actually met, so the
host, which may not have numpy, can still carry plain bytes.

With an :class:`Offload` (shared memory, negotiated in ``hello``; see :mod:`mlbridge._shm`, which
does the I/O: this module stays sans-I/O), arrays and byte strings of at least its ``threshold``
bytes travel as ext type 2, a handle ``[kind, name, nbytes, dtype, shape]`` plus ``offset, mode``
for a pooled segment; an array that is an unchanged piece of a received segment is handed back as
a handle of that segment (``Offload.reuse``) instead of copied. A byte string is only looked for
when the encoded frame came out larger than the threshold, so small messages cost exactly what
they did.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import orjson

from ..errors import DecodeError, UnsupportedPayloadError

__all__ = [
    "CODECS",
    "Codec",
    "JsonCodec",
    "MsgpackCodec",
    "NDArrayPayload",
    "Offload",
    "get_codec",
    "plain_msgpack",
]

NDARRAY_EXT = 1
SHM_EXT = 2
# A reused packer's buffer grows to the largest message it packed: past this it is replaced.
_PACKER_KEEP_BYTES = 1 << 20
_EXT_HEADER = struct.Struct(">H")


@dataclass(frozen=True, slots=True)
class NDArrayPayload:
    """An array received where numpy is not importable: dtype string, shape and raw bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def tolist(self) -> Any:
        """The values as (nested) Python lists, as numpy's ``tolist`` gives them; None for a
        dtype that has no plain number format (complex, strings, datetimes)."""
        fmt = _STRUCT_FORMATS.get(self.dtype.lstrip("<>=|"))
        if fmt is None:
            return None
        order = ">" if self.dtype.startswith(">") else "<"
        count = len(self.data) // struct.calcsize(fmt)
        flat = list(struct.unpack(f"{order}{count}{fmt}", self.data))
        return _nested(flat, self.shape) if self.shape else flat[0]


# numpy dtype codes (``arr.dtype.str`` without its byte order) -> struct formats
_STRUCT_FORMATS = {
    "f2": "e",
    "f4": "f",
    "f8": "d",
    "i1": "b",
    "i2": "h",
    "i4": "i",
    "i8": "q",
    "u1": "B",
    "u2": "H",
    "u4": "I",
    "u8": "Q",
    "b1": "?",
}


def _nested(flat: list[Any], shape: tuple[int, ...]) -> Any:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nested(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


class OffloadLease(Protocol):
    """A buffer handed to the offload: the handle's ``mode``, segment ``name`` and ``offset``."""

    mode: str
    name: str
    offset: int


class Offload(Protocol):
    """Where large buffers go instead of the frame (implemented by :mod:`mlbridge._shm`)."""

    threshold: int

    def put(self, data: memoryview) -> OffloadLease: ...

    def reuse(self, arr: Any) -> OffloadLease | None: ...

    def take(self, name: object, nbytes: object, offset: object, mode: object) -> Any: ...

    def discard(self, leases: list[Any]) -> None: ...


class _BigBytes:
    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data


_SCAN_ITEMS = 64  # containers longer than this are not searched for byte strings


def _swap_big_bytes(obj: Any, threshold: int, found: list[bool]) -> Any:
    """A copy of ``obj``'s containers with byte strings of ``threshold`` bytes or more marked
    (``found`` gets True when there was one). Long containers are left as they are: a walk of
    a million-item list would cost more than the copy it saves."""
    if isinstance(obj, bytes | bytearray):
        if len(obj) >= threshold:
            found.append(True)
            return _BigBytes(obj)
        return obj
    if isinstance(obj, dict) and len(obj) <= _SCAN_ITEMS:
        return {k: _swap_big_bytes(v, threshold, found) for k, v in obj.items()}
    if isinstance(obj, list | tuple) and len(obj) <= _SCAN_ITEMS:
        return [_swap_big_bytes(v, threshold, found) for v in obj]
    return obj


class _NeedsOffloadError(Exception):
    pass


class _BigArrayFinder:
    """``default`` for the fast path: encodes as usual until a large array shows up."""

    __slots__ = ("threshold",)

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def __call__(self, o: Any) -> Any:
        if _is_ndarray(o) and o.nbytes >= self.threshold:
            raise _NeedsOffloadError
        return _msgpack_default(o)


class Codec(Protocol):
    name: str

    def encode(self, obj: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...

    def encoder(self) -> Callable[[Any], bytes]:
        """``encode`` for one thread at a time (its caller serialises calls, e.g. under a write
        lock): it may reuse state between calls (MessagePack: one packer, not one per call)."""
        ...

    def decoder(self) -> Callable[[bytes | memoryview], Any]:
        """``decode`` without its error translation (the decoding library's own exceptions):
        for a hot path that calls ``decode`` for the typed error when this raises."""
        ...


def _is_ndarray(obj: Any) -> bool:
    t = type(obj)
    return t.__module__ == "numpy" and t.__name__ == "ndarray"


def _is_numpy_scalar(obj: Any) -> bool:
    return type(obj).__module__ == "numpy" and hasattr(obj, "item")


class JsonCodec:
    name = "json"

    @staticmethod
    def _default(obj: Any) -> Any:
        if isinstance(obj, bytes | bytearray | memoryview) or _is_ndarray(obj):
            raise UnsupportedPayloadError(
                f"{type(obj).__name__} cannot travel over the JSON codec: binary data is never "
                "base64-encoded. Negotiate MessagePack (hello with codecs=['msgpack']) to send it."
            )
        if _is_numpy_scalar(obj):
            return obj.item()
        if isinstance(obj, set | frozenset | tuple):
            return list(obj)
        raise UnsupportedPayloadError(
            f"{type(obj).__name__} is not JSON-serialisable; return plain dicts, lists, str, "
            "numbers, bools or None"
        )

    def encode(self, obj: Any) -> bytes:
        try:
            return orjson.dumps(obj, default=self._default)
        except UnsupportedPayloadError:
            raise
        except orjson.JSONEncodeError as exc:
            cause = exc.__cause__
            if isinstance(cause, UnsupportedPayloadError):
                raise cause from None
            if "64-bit range" in str(exc):
                raise UnsupportedPayloadError(
                    "an integer is out of the 64-bit range JSON (orjson) can carry "
                    "(-2**63 to 2**64-1); send it as a string (str(n)), or as a float if "
                    "precision may go"
                ) from exc
            raise UnsupportedPayloadError(f"cannot encode as JSON: {exc}") from exc

    def encoder(self) -> Callable[[Any], bytes]:
        return self.encode

    def decoder(self) -> Callable[[bytes | memoryview], Any]:
        return orjson.loads

    def decode(self, data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"frame is not valid UTF-8 JSON: {exc}") from exc


def _int_out_of_range(n: int, codec: str) -> UnsupportedPayloadError:
    bits = n.bit_length()
    # str() of a huge int is slow (and limited by sys.set_int_max_str_digits): describe it.
    shown = f"the integer {n}" if bits <= 128 else f"a {bits}-bit integer"
    return UnsupportedPayloadError(
        f"{shown} is out of the 64-bit range {codec} can carry "
        "(-2**63 to 2**64-1); send it as a string (str(n)), or as a float if precision may go"
    )


def _msgpack_default(obj: Any) -> Any:
    if isinstance(obj, int):
        # msgpack hands over only the ints it cannot pack: those beyond 64 bits.
        raise _int_out_of_range(obj, "MessagePack")
    if _is_ndarray(obj):
        arr = obj if obj.flags.c_contiguous else obj.copy(order="C")
        if arr.dtype.hasobject:
            raise UnsupportedPayloadError("object-dtype arrays cannot be sent; convert to a list")
        header = msgpack.packb([arr.dtype.str, list(arr.shape)])
        return msgpack.ExtType(NDARRAY_EXT, _EXT_HEADER.pack(len(header)) + header + arr.tobytes())
    if _is_numpy_scalar(obj):
        return obj.item()
    if isinstance(obj, set | frozenset):
        return list(obj)
    if isinstance(obj, memoryview):
        return obj.tobytes()
    raise UnsupportedPayloadError(
        f"{type(obj).__name__} cannot be sent with MessagePack; return plain dicts, lists, str, "
        "numbers, bools, None, bytes or numpy arrays"
    )


def _msgpack_ext_hook(code: int, data: bytes) -> Any:
    if code == SHM_EXT:
        raise DecodeError(
            "a shared-memory payload handle arrived, but shared memory was not negotiated"
        )
    if code != NDARRAY_EXT:
        raise DecodeError(f"unknown MessagePack ext type {code}")
    (hlen,) = _EXT_HEADER.unpack_from(data)
    dtype, shape = msgpack.unpackb(data[2 : 2 + hlen])
    body = memoryview(data)[2 + hlen :]
    try:
        import numpy as np
    except ImportError:
        return NDArrayPayload(dtype, tuple(shape), bytes(body))
    # One copy into a bytearray, so that the array is writable like any array a handler makes.
    return np.frombuffer(bytearray(body), dtype=np.dtype(dtype)).reshape(shape)


def _handle(kind: str, fields: list[Any], lease: OffloadLease) -> bytes:
    """Ext type 2's payload: ``[kind, name, nbytes, dtype, shape]`` (no dtype and shape for
    bytes) for a one-shot segment, as before pools; ``offset, mode`` follow for a pooled
    segment or one sent back."""
    if lease.mode == "once":
        return msgpack.packb([kind, *fields])  # type: ignore[no-any-return]
    if kind != "nd":
        fields = [*fields, None, None]
    return msgpack.packb([kind, *fields, lease.offset, lease.mode])  # type: ignore[no-any-return]


class MsgpackCodec:
    name = "msgpack"

    def __init__(self, offload: Offload | None = None) -> None:
        self.offload = offload
        self._ext_hook = _msgpack_ext_hook if offload is None else self._shm_ext_hook
        self._finder = _BigArrayFinder(offload.threshold if offload is not None else 0)

    def encode(self, obj: Any) -> bytes:
        if self.offload is not None:
            return self._encode_offloading(obj, self.offload)
        # packb builds a packer per call: thread-safe, and cheap next to a pipe round trip.
        try:
            return msgpack.packb(obj, default=_msgpack_default, use_bin_type=True)  # type: ignore[no-any-return]
        except UnsupportedPayloadError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnsupportedPayloadError(f"cannot encode as MessagePack: {exc}") from exc

    def encoder(self) -> Callable[[Any], bytes]:
        """A non-thread-safe ``encode`` that reuses one packer (a small message costs about
        half of a ``packb``, which builds and frees a packer each time). A message of
        :data:`_PACKER_KEEP_BYTES` or more is packed with a fresh packer, so the reused one
        never keeps a large buffer."""
        offload = self.offload
        # With shared memory: the plain encode, given up at the first large array (as encode).
        default = _msgpack_default if offload is None else self._finder
        pack = msgpack.Packer(default=default, use_bin_type=True).pack

        def encode(obj: Any) -> bytes:
            nonlocal pack
            try:
                out: bytes = pack(obj)  # on an error the packer resets itself
            except _NeedsOffloadError:
                assert offload is not None
                pack = msgpack.Packer(default=default, use_bin_type=True).pack
                return self._encode_offloaded(obj, offload)
            except UnsupportedPayloadError:
                raise
            except (TypeError, ValueError, OverflowError) as exc:
                raise UnsupportedPayloadError(f"cannot encode as MessagePack: {exc}") from exc
            n = len(out)
            if n >= _PACKER_KEEP_BYTES:
                pack = msgpack.Packer(default=default, use_bin_type=True).pack
            if offload is not None and n >= offload.threshold:
                del out  # a large byte string may be in there: as encode does
                return self._encode_offloaded(obj, offload)
            return out

        return encode

    def _encode_offloading(self, obj: Any, offload: Offload) -> bytes:
        threshold = offload.threshold
        # Fast path, the small message: a plain encode, given up at the first large array.
        try:
            out: bytes = msgpack.packb(obj, default=self._finder, use_bin_type=True)
        except _NeedsOffloadError:
            pass
        except UnsupportedPayloadError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnsupportedPayloadError(f"cannot encode as MessagePack: {exc}") from exc
        else:
            if len(out) < threshold:
                return out
            del out
        return self._encode_offloaded(obj, offload)

    def _encode_offloaded(self, obj: Any, offload: Offload) -> bytes:
        """``obj`` with its large arrays and byte strings in shared memory (the slow path)."""
        threshold = offload.threshold
        written: list[OffloadLease] = []

        def default(o: Any) -> Any:
            if _is_ndarray(o) and o.nbytes >= threshold and not o.dtype.hasobject:
                lease = offload.reuse(o)  # a piece of a received segment, unchanged: no copy
                if lease is None:
                    arr = o if o.flags.c_contiguous else o.copy(order="C")
                    lease = offload.put(memoryview(arr.reshape(-1).view("u1")))
                written.append(lease)
                handle = [lease.name, o.nbytes, o.dtype.str, list(o.shape)]
                return msgpack.ExtType(SHM_EXT, _handle("nd", handle, lease))
            if isinstance(o, _BigBytes):
                lease = offload.put(memoryview(o.data))
                written.append(lease)
                kind = "bytearray" if isinstance(o.data, bytearray) else "bytes"
                return msgpack.ExtType(SHM_EXT, _handle(kind, [lease.name, len(o.data)], lease))
            return _msgpack_default(o)

        try:
            out: bytes = msgpack.packb(obj, default=default, use_bin_type=True)
            if len(out) >= threshold:  # a large byte string may be in there: hand it over too
                found: list[bool] = []
                swapped = _swap_big_bytes(obj, threshold, found)
                if found:
                    del out
                    offload.discard(written)  # the first pass's arrays: written again below
                    written.clear()
                    out = msgpack.packb(swapped, default=default, use_bin_type=True)
            return out
        except BaseException as exc:
            offload.discard(written)
            if isinstance(exc, UnsupportedPayloadError):
                raise
            if isinstance(exc, TypeError | ValueError | OverflowError):
                raise UnsupportedPayloadError(f"cannot encode as MessagePack: {exc}") from exc
            raise

    def _shm_ext_hook(self, code: int, data: bytes) -> Any:
        if code != SHM_EXT:
            return _msgpack_ext_hook(code, data)
        assert self.offload is not None
        handle = msgpack.unpackb(data)
        kind, name, nbytes = handle[0], handle[1], handle[2]
        offset, mode = (handle[5], handle[6]) if len(handle) >= 7 else (0, "once")
        try:
            buf, start = self.offload.take(name, nbytes, offset, mode)
        except (OSError, ValueError) as exc:
            raise DecodeError(f"shared-memory payload {name!r} cannot be read: {exc}") from exc
        if kind == "bytes":
            return buf[start : start + nbytes]
        if kind == "bytearray":
            return bytearray(buf[start : start + nbytes])
        dtype, shape = handle[3], handle[4]
        try:
            import numpy as np
        except ImportError:
            return NDArrayPayload(dtype, tuple(shape), buf[start : start + nbytes])
        dt = np.dtype(dtype)
        # a view of the mapping (private copy-on-write for a pooled segment: writes stay ours)
        return np.frombuffer(buf, dtype=dt, count=nbytes // dt.itemsize, offset=start).reshape(
            shape
        )

    def decoder(self) -> Callable[[bytes | memoryview], Any]:
        hook = self._ext_hook
        unpackb = msgpack.unpackb

        def decode(data: bytes | memoryview) -> Any:
            return unpackb(data, raw=False, ext_hook=hook, strict_map_key=False)

        return decode

    def decode(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(data, raw=False, ext_hook=self._ext_hook, strict_map_key=False)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(f"frame is not valid MessagePack: {exc}") from exc


CODECS: dict[str, Callable[[], Codec]] = {"json": JsonCodec, "msgpack": MsgpackCodec}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None


def _plain_ready(obj: Any) -> Any:
    if isinstance(obj, NDArrayPayload):
        header = msgpack.packb([obj.dtype, list(obj.shape)])
        return msgpack.ExtType(NDARRAY_EXT, _EXT_HEADER.pack(len(header)) + header + obj.data)
    if isinstance(obj, dict):
        return {k: _plain_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain_ready(v) for v in obj]
    return obj


def plain_msgpack(obj: Any) -> bytes:
    """A decoded value (as the host hands it out) as MessagePack for a client: numpy arrays as
    ext type 1 (the wire's array encoding), ``bytes`` as bin, never shared memory."""
    return MsgpackCodec().encode(_plain_ready(obj))
