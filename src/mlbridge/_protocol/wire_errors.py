"""Failures on the wire <-> exceptions, by stable code. Never pickles.

The worker classifies an exception into a stable ``error_code``; the host turns a failure
payload back into the matching :mod:`mlbridge.errors` class, keeping the worker's exception type
name and traceback text (attached as ``__cause__``).
"""

from __future__ import annotations

import traceback as _tb
from typing import Any

from .. import errors as err
from .messages import Failure

__all__ = [
    "CODE_TO_ERROR",
    "classify_exception",
    "exception_from_failure",
    "failure_from_exception",
]

CODE_TO_ERROR: dict[str, type[err.MLBridgeError]] = {
    "invalid_request": err.InvalidRequestError,
    "unknown_command": err.UnknownCommandError,
    "invalid_namespace": err.UnknownCommandError,
    "invalid_configuration": err.InvalidConfigurationError,
    "model_error": err.ModelError,
    "rate_limit": err.RateLimitError,
    "resource_not_found": err.ResourceNotFoundError,
    "cancelled": err.CancelledCallError,
    "callback_error": err.CallbackError,
    "timeout": err.CallTimeoutError,
    "checkout_timeout": err.CheckoutTimeoutError,
    "worker_crashed": err.WorkerCrashedError,
    "resource_limit": err.ResourceLimitError,
    "bridge_unavailable": err.BridgeUnavailableError,
    "bridge_broken": err.BridgeBrokenError,
    "framework_not_found": err.FrameworkNotFoundError,
    "frame_too_large": err.FrameTooLargeError,
    "decode_error": err.DecodeError,
    "unsupported_payload": err.UnsupportedPayloadError,
    "protocol_error": err.ProtocolError,
    "unknown": err.RemoteError,
}

# Name fragments of third-party exception types (OpenAI, LiteLLM, HTTP clients, torch...) that
# tell the common kind without importing those libraries.
_NAME_HINTS: tuple[tuple[str, str], ...] = (
    ("RateLimit", "rate_limit"),
    ("TooManyRequests", "rate_limit"),
    ("Timeout", "timeout"),
    ("Authentication", "invalid_configuration"),
    ("PermissionDenied", "invalid_configuration"),
    ("BadRequest", "invalid_request"),
    ("NotFound", "model_error"),
    ("OutOfMemory", "model_error"),
    ("ContextWindow", "model_error"),
)


def classify_exception(exc: BaseException) -> str:
    if isinstance(exc, err.MLBridgeError):
        return exc.code
    for klass in type(exc).__mro__:
        name = klass.__name__
        for hint, code in _NAME_HINTS:
            if hint in name:
                return code
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, MemoryError):
        return "model_error"
    return "unknown"


def failure_from_exception(
    rid: int, exc: BaseException, *, code: str | None = None, with_traceback: bool = True
) -> Failure:
    tb = "".join(_tb.format_exception(exc)) if with_traceback else None
    if isinstance(exc, err.MLBridgeError) and exc.remote_traceback and with_traceback:
        tb = (tb or "") + "\nRemote traceback:\n" + exc.remote_traceback
    details = exc.details if isinstance(exc, err.MLBridgeError) and exc.details else None
    error_type = exc.remote_type if isinstance(exc, err.MLBridgeError) and exc.remote_type else None
    return Failure(
        id=rid,
        error=str(exc) or type(exc).__name__,
        error_type=error_type or type(exc).__name__,
        error_code=code or classify_exception(exc),
        traceback=tb,
        details=_plain(details),
    )


def _plain(details: dict[str, Any] | None) -> dict[str, Any] | None:
    if not details:
        return None
    return {k: v for k, v in details.items() if isinstance(v, str | int | float | bool | None)}


def exception_from_failure(failure: Failure, *, context: str = "") -> err.MLBridgeError:
    cls = CODE_TO_ERROR.get(failure.error_code, err.RemoteError)
    message = failure.error if not context else f"{context}: {failure.error}"
    exc = cls(message)
    # Set, not passed as keywords: a key such as "message" must not clash with the signature.
    details = failure.details
    exc.details = {str(k): v for k, v in details.items()} if isinstance(details, dict) else {}
    exc.remote_type = failure.error_type
    exc.remote_traceback = failure.traceback
    if failure.traceback:
        exc.__cause__ = err.RemoteTraceback(failure.traceback)
    return exc
