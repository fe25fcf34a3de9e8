"""Every exception mlbridge raises, in one tree.

::

    MLBridgeError
    ├── InvalidArgumentError (ValueError)        a bad argument to the Python API (e.g. timeout)
    ├── ConfigError (ValueError)                 bad configuration, found at load/registration
    │   └── EnvironmentCheckError                a bridge's interpreter/packages/env vars missing
    ├── ProtocolError                            the byte stream or a message is malformed
    │   ├── FrameTooLargeError                   a frame over max_frame_bytes (refused unread)
    │   ├── DecodeError                          a frame that is not valid JSON / MessagePack
    │   └── UnsupportedPayloadError (TypeError)  e.g. bytes or arrays sent with the JSON codec
    ├── BridgeError                              a worker answered with a failure
    │   ├── InvalidRequestError (ValueError)     bad arguments, unknown command or namespace
    │   │   └── UnknownCommandError
    │   ├── InvalidConfigurationError (ValueError)  the framework rejected its configuration
    │   ├── ModelError                           the model failed, is missing, or does not fit
    │   ├── RateLimitError                       the provider throttled the call
    │   ├── ResourceNotFoundError (LookupError)  no resource with that id
    │   ├── CancelledCallError                   the call was cancelled before it finished
    │   ├── CallbackError                        a call from a worker back through the host failed
    │   └── RemoteError                          any other failure in the worker (code "unknown")
    ├── MLBridgeTimeoutError (TimeoutError)
    │   ├── CallTimeoutError                     the call ran past its timeout (worker replaced)
    │   └── CheckoutTimeoutError                 every worker stayed busy past checkout_timeout
    ├── WorkerCrashedError                       the worker died while holding the call
    ├── BridgeUnavailableError                   the bridge cannot take calls now
    │   └── BridgeBrokenError                    its workers keep failing to boot
    └── FrameworkNotFoundError (LookupError)     no bridge of that name is registered

Each class carries a stable ``code`` (the ``error_code`` on the wire). A failure that crosses the
wire keeps the worker's exception type name in ``remote_type`` and its traceback text in
``remote_traceback`` (also attached as ``__cause__``); exceptions are never pickled.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "KINDS",
    "BridgeBrokenError",
    "BridgeError",
    "BridgeUnavailableError",
    "CallTimeoutError",
    "CallbackError",
    "CancelledCallError",
    "CheckoutTimeoutError",
    "ConfigError",
    "DecodeError",
    "EnvironmentCheckError",
    "FrameTooLargeError",
    "FrameworkNotFoundError",
    "InvalidArgumentError",
    "InvalidConfigurationError",
    "InvalidRequestError",
    "MLBridgeError",
    "MLBridgeTimeoutError",
    "ModelError",
    "ProtocolError",
    "RateLimitError",
    "RemoteError",
    "RemoteTraceback",
    "ResourceLimitError",
    "ResourceNotFoundError",
    "UnknownCommandError",
    "UnsupportedPayloadError",
    "WorkerCrashedError",
]


#: Stable codes -> the common kinds framework failures are translated to.
KINDS = (
    "invalid_configuration",
    "model_error",
    "rate_limit",
    "timeout",
    "worker_crashed",
    "unknown",
)
_KIND_OF_CODE = {
    "invalid_configuration": "invalid_configuration",
    "model_error": "model_error",
    "rate_limit": "rate_limit",
    "timeout": "timeout",
    "checkout_timeout": "timeout",
    "worker_crashed": "worker_crashed",
    "resource_limit": "worker_crashed",
}


class MLBridgeError(Exception):
    """Base of every mlbridge error."""

    code: ClassVar[str] = "unknown"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details
        self.remote_type: str | None = None
        self.remote_traceback: str | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def kind(self) -> str:
        """The common kind: invalid_configuration, model_error, rate_limit, timeout,
        worker_crashed, or unknown (see :data:`KINDS`)."""
        return _KIND_OF_CODE.get(self.code, "unknown")


class InvalidArgumentError(MLBridgeError, ValueError):
    code = "invalid_argument"


class ConfigError(MLBridgeError, ValueError):
    code = "invalid_configuration"


class EnvironmentCheckError(ConfigError):
    code = "invalid_configuration"


class ProtocolError(MLBridgeError):
    code = "protocol_error"


class FrameTooLargeError(ProtocolError):
    code = "frame_too_large"


class DecodeError(ProtocolError):
    code = "decode_error"


class UnsupportedPayloadError(ProtocolError, TypeError):
    code = "unsupported_payload"


class BridgeError(MLBridgeError):
    code = "unknown"


class InvalidRequestError(BridgeError, ValueError):
    code = "invalid_request"


class UnknownCommandError(InvalidRequestError):
    code = "unknown_command"


class InvalidConfigurationError(BridgeError, ValueError):
    code = "invalid_configuration"


class ModelError(BridgeError):
    code = "model_error"


class RateLimitError(BridgeError):
    code = "rate_limit"


class ResourceNotFoundError(BridgeError, LookupError):
    code = "resource_not_found"


class CancelledCallError(BridgeError):
    code = "cancelled"


class CallbackError(BridgeError):
    code = "callback_error"


class RemoteError(BridgeError):
    code = "unknown"


class MLBridgeTimeoutError(MLBridgeError, TimeoutError):
    code = "timeout"


class CallTimeoutError(MLBridgeTimeoutError):
    code = "timeout"


class CheckoutTimeoutError(MLBridgeTimeoutError):
    code = "checkout_timeout"


class WorkerCrashedError(MLBridgeError):
    code = "worker_crashed"


class ResourceLimitError(WorkerCrashedError):
    """A worker hit one of its bridge's OS-enforced limits (``max_memory``, ``max_processes``,
    ``max_open_files``...): ``details`` hold ``limit``, ``value`` and ``fix``; the pool replaces
    the worker."""

    code = "resource_limit"


class BridgeUnavailableError(MLBridgeError):
    code = "bridge_unavailable"


class BridgeBrokenError(BridgeUnavailableError):
    code = "bridge_broken"


class FrameworkNotFoundError(MLBridgeError, LookupError):
    code = "framework_not_found"


class RemoteTraceback(Exception):  # noqa: N818 - text of a remote traceback, as CPython names it
    """The text of a traceback raised in a worker, attached as ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
