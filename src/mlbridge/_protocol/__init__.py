"""The wire protocol, sans I/O: framing, codecs, typed messages, wire errors, exit codes."""

from .codec import CODECS, Codec, JsonCodec, MsgpackCodec, NDArrayPayload, get_codec
from .framing import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    OversizedFrame,
    encode_frame,
    frame_header,
)
from .messages import (
    CONTROL_COMMANDS,
    PROTOCOL_VERSION,
    CallbackRequest,
    Chunk,
    Failure,
    MessageError,
    Request,
    Success,
    parse_request,
    split_namespace,
    timestamp,
)
from .wire_errors import classify_exception, exception_from_failure, failure_from_exception

__all__ = [
    "CODECS",
    "CONTROL_COMMANDS",
    "DEFAULT_MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "CallbackRequest",
    "Chunk",
    "Codec",
    "Failure",
    "FrameDecoder",
    "JsonCodec",
    "MessageError",
    "MsgpackCodec",
    "NDArrayPayload",
    "OversizedFrame",
    "Request",
    "Success",
    "classify_exception",
    "encode_frame",
    "exception_from_failure",
    "failure_from_exception",
    "frame_header",
    "get_codec",
    "parse_request",
    "split_namespace",
    "timestamp",
]
