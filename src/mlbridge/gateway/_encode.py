"""Results to HTTP bodies: JSON by default (arrays as nested lists), MessagePack on request.

``Accept: application/msgpack`` (or ``application/x-msgpack``) gets the result as MessagePack,
with numpy arrays as the wire protocol's ext type 1 (a 2-byte big-endian header length, a
MessagePack ``[dtype, shape]`` header, then the raw C-order buffer) and ``bytes`` as bin. JSON
carries arrays as (nested) lists and bytes as ``{"$bytes_base64": "..."}``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mlbridge._protocol.codec import NDArrayPayload, plain_msgpack

__all__ = ["MSGPACK", "jsonable", "render", "to_json_bytes", "wants_msgpack"]

MSGPACK = "application/msgpack"
_MSGPACK_TYPES = (MSGPACK, "application/x-msgpack")


def wants_msgpack(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return any(t.split(";")[0].strip().lower() in _MSGPACK_TYPES for t in accept.split(","))


def _payload_list(obj: NDArrayPayload) -> Any:
    values = obj.tolist()
    if values is None:
        return {
            "dtype": obj.dtype,
            "shape": list(obj.shape),
            "$bytes_base64": base64.b64encode(obj.data).decode("ascii"),
        }
    return values


def _float(x: float) -> Any:
    return x if math.isfinite(x) else str(x)  # JSON has no NaN/Infinity


def jsonable(obj: Any) -> Any:
    """A copy of ``obj`` made of JSON types (arrays -> lists, bytes -> base64, NaN -> "nan")."""
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, float):
        return _float(obj)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, NDArrayPayload):
        return jsonable(_payload_list(obj))
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"$bytes_base64": base64.b64encode(bytes(obj)).decode("ascii")}
    tolist = getattr(obj, "tolist", None)
    if callable(tolist) and hasattr(obj, "dtype"):  # numpy arrays and scalars
        return jsonable(tolist())
    return repr(obj)


def to_json_bytes(obj: Any) -> bytes:
    return json.dumps(jsonable(obj), ensure_ascii=False, separators=(",", ":")).encode()


def render(request: Request, payload: Any, status_code: int = 200) -> Response:
    """``payload`` as JSON, or as MessagePack when the client asked for it."""
    if wants_msgpack(request):
        return Response(plain_msgpack(payload), status_code=status_code, media_type=MSGPACK)
    return Response(to_json_bytes(payload), status_code=status_code, media_type="application/json")
