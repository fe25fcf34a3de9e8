"""Failures to HTTP: one status per mlbridge error class, every body in OpenAI's error shape.

Body: ``{"error": {"message", "type", "param", "code", "request_id"}}`` on every route (the
REST API uses the same shape as ``/v1``, so a client parses one thing). ``message`` names the
cause and the fix; known secret values are masked in it. Bad input is always a 4xx; a 5xx means
the bridge or the gateway failed (a worker crash: 502, a timeout: 504, a broken or closing
bridge: 503).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mlbridge import errors as e
from mlbridge._redact import redact_text

__all__ = ["HTTPError", "body", "from_exception", "openai_type"]

# (class, HTTP status), most specific first
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (e.FrameworkNotFoundError, 404),
    (e.ResourceNotFoundError, 404),
    (e.UnknownCommandError, 400),
    (e.InvalidRequestError, 400),
    (e.InvalidArgumentError, 400),
    (e.InvalidConfigurationError, 400),
    (e.ConfigError, 400),
    (e.UnsupportedPayloadError, 400),
    (e.FrameTooLargeError, 413),
    (e.ModelError, 422),
    (e.RateLimitError, 429),
    (e.CancelledCallError, 499),
    (e.CheckoutTimeoutError, 503),
    (e.MLBridgeTimeoutError, 504),
    (e.WorkerCrashedError, 502),
    (e.BridgeUnavailableError, 503),
    (e.CallbackError, 502),
    (e.BridgeError, 502),
    (e.MLBridgeError, 500),
)


def openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


class HTTPError(Exception):
    """A failure the gateway itself finds (bad input, auth, limits), with its status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def body(
    status: int,
    message: str,
    *,
    code: str | None,
    param: str | None = None,
    request_id: str | None = None,
    secrets: Iterable[str] = (),
) -> dict[str, Any]:
    return {
        "error": {
            "message": redact_text(message, secrets),
            "type": openai_type(status),
            "param": param,
            "code": code,
            "request_id": request_id,
        }
    }


def from_exception(exc: BaseException) -> HTTPError:
    """The HTTP form of an mlbridge error (anything else is a 500 the caller logs)."""
    if isinstance(exc, HTTPError):
        return exc
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            code = getattr(exc, "code", None)
            message = str(exc) or type(exc).__name__
            return HTTPError(status, message, code=code)
    return HTTPError(
        500,
        f"internal gateway error ({type(exc).__name__}); the server log has the details under "
        "this request id",
        code="internal_error",
    )
