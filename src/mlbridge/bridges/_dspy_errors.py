"""DSPy / LiteLLM failures -> mlbridge's common kinds, keeping the original type and text.

DSPy 3.4 wraps provider failures in ``dspy.utils.exceptions`` (``LMRateLimitError``,
``LMAuthError``, ``LMTimeoutError``, ``AdapterParseError``...); raw LiteLLM or HTTP-client errors
may also surface. :func:`translate` maps them by class name (no import of those libraries is
needed), and :func:`translating` applies it at the bridge boundary with ``raise ... from exc``.
The wire then carries the stable code plus the original type name (``error_type``) and text.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from ..errors import (
    CallTimeoutError,
    InvalidConfigurationError,
    MLBridgeError,
    ModelError,
    RateLimitError,
)

__all__ = ["translate", "translating"]

_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)

# First match wins; names are checked along the exception's MRO (most specific first).
_BY_NAME: tuple[tuple[str, type[MLBridgeError]], ...] = (
    ("LMRateLimitError", RateLimitError),
    ("RateLimitError", RateLimitError),
    ("TooManyRequests", RateLimitError),
    ("LMTimeoutError", CallTimeoutError),
    ("Timeout", CallTimeoutError),
    ("LMAuthError", InvalidConfigurationError),
    ("AuthenticationError", InvalidConfigurationError),
    ("PermissionDenied", InvalidConfigurationError),
    ("LMBillingError", InvalidConfigurationError),
    ("LMNotConfiguredError", InvalidConfigurationError),
    ("LMConfigurationError", InvalidConfigurationError),
    ("LMUnsupportedModelError", InvalidConfigurationError),
    ("LMUnsupportedFeatureError", InvalidConfigurationError),
    ("NotFoundError", InvalidConfigurationError),
    ("ContextWindowExceededError", ModelError),
    ("AdapterParseError", ModelError),
    ("LMError", ModelError),
    ("APIConnectionError", ModelError),
    ("ServiceUnavailableError", ModelError),
    ("InternalServerError", ModelError),
    ("APIError", ModelError),
)


def translate(exc: BaseException) -> BaseException:
    """The mlbridge error for ``exc`` (``exc`` itself when it is one, or is not a DSPy failure)."""
    if isinstance(exc, MLBridgeError):
        return exc
    names = {k.__name__ for k in type(exc).__mro__}
    if "LMTransportError" in names and _TIMED_OUT.search(str(exc)):
        # DSPy reports a provider that stopped answering as a transport failure.
        return _make(CallTimeoutError, exc)
    for klass in type(exc).__mro__:
        for name, target in _BY_NAME:
            if klass.__name__ == name or (
                name in ("Timeout", "TooManyRequests") and name in klass.__name__
            ):
                return _make(target, exc)
    return exc


def _make(target: type[MLBridgeError], exc: BaseException) -> MLBridgeError:
    out = target(str(exc) or type(exc).__name__)
    out.remote_type = type(exc).__name__
    return out


@contextlib.contextmanager
def translating() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        out = translate(exc)
        if out is exc:
            raise
        raise out from exc
