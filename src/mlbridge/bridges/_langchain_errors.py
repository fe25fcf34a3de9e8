"""LangChain failures -> mlbridge's common kinds, keeping the original type and text; cancel.

:func:`translate` maps by class name along the exception's MRO, so no provider package needs to
be imported: output-parser failures and provider errors become ``model_error``, throttling
``rate_limit``, timeouts ``timeout``, bad credentials or unknown models
``invalid_configuration``; a prompt missing one of its variables is a bad request. The wire
carries the stable code plus the original type name (``error_type``) and text; any API key the
bridge knows is masked in that text.

:class:`CancelHandler` is a LangChain callback handler (``raise_error = True``, so LangChain lets
its exception through) that raises :class:`Cancelled` at the next chain, model, token or tool
event once the enclosing call's cancel flag is set.
"""

from __future__ import annotations

import contextlib
import re
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler

from .._redact import redact_text
from ..errors import (
    CallTimeoutError,
    CancelledCallError,
    InvalidConfigurationError,
    InvalidRequestError,
    MLBridgeError,
    ModelError,
    RateLimitError,
    RemoteError,
)

__all__ = ["CancelHandler", "Cancelled", "translate", "translating"]

_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)

# First match wins; names are checked along the exception's MRO (most specific first).
_BY_NAME: tuple[tuple[str, type[MLBridgeError]], ...] = (
    ("OutputParserException", ModelError),
    ("RateLimitError", RateLimitError),
    ("TooManyRequests", RateLimitError),
    ("APITimeoutError", CallTimeoutError),
    ("TimeoutException", CallTimeoutError),
    ("ReadTimeout", CallTimeoutError),
    ("ConnectTimeout", CallTimeoutError),
    ("TimeoutError", CallTimeoutError),
    ("AuthenticationError", InvalidConfigurationError),
    ("PermissionDeniedError", InvalidConfigurationError),
    ("NotFoundError", InvalidConfigurationError),
    ("BadRequestError", InvalidRequestError),
    ("APIConnectionError", ModelError),
    ("InternalServerError", ModelError),
    ("APIStatusError", ModelError),
    ("APIError", ModelError),
)


class Cancelled(Exception):  # noqa: N818 - a signal raised into LangChain, never shown
    """Raised into a running chain by :class:`CancelHandler`."""


class CancelHandler(BaseCallbackHandler):
    """Stops a chain at its next event once ``cancelled()`` is true."""

    raise_error = True
    run_inline = True

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        self._cancelled = cancelled

    def _check(self, *args: Any, **kwargs: Any) -> None:
        if self._cancelled():
            raise Cancelled("the call was cancelled")

    on_chain_start = _check
    on_llm_start = _check
    on_chat_model_start = _check
    on_llm_new_token = _check
    on_tool_start = _check
    on_tool_end = _check
    on_retriever_start = _check


def translate(exc: BaseException, secrets: Iterable[str] = ()) -> BaseException:
    """The mlbridge error for ``exc`` (``exc`` itself when it needs no translation)."""
    if isinstance(exc, MLBridgeError):
        return exc
    names = [k.__name__ for k in type(exc).__mro__]
    if isinstance(exc, KeyError) and "missing variables" in str(exc):
        return _make(InvalidRequestError, exc, secrets)
    if "APIConnectionError" in names and _TIMED_OUT.search(str(exc)):
        return _make(CallTimeoutError, exc, secrets)
    for name in names:
        for wanted, target in _BY_NAME:
            if name == wanted:
                return _make(target, exc, secrets)
    return exc


def _make(target: type[MLBridgeError], exc: BaseException, secrets: Iterable[str]) -> MLBridgeError:
    text = redact_text(str(exc) or type(exc).__name__, secrets)
    if isinstance(exc, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]  # KeyError's str() quotes its message
    out = target(text)
    out.remote_type = type(exc).__name__
    return out


@contextlib.contextmanager
def translating(where: str, secrets: Callable[[], Iterable[str]] = tuple) -> Iterator[None]:
    """Translate at the bridge boundary; :class:`Cancelled` becomes CancelledCallError."""
    try:
        yield
    except Cancelled as exc:
        raise CancelledCallError(f"{where} was cancelled") from exc
    except Exception as exc:
        known = list(secrets())
        out = translate(exc, known)
        # The failure's traceback travels too: an original exception whose text or traceback
        # holds a key is not chained (its masked text and type name are kept).
        leaky = bool(known) and _mentions(exc, known)
        if out is exc:
            if not leaky:
                raise
            out = _make(RemoteError, exc, known)
        if leaky:
            raise out from None
        raise out from exc


def _mentions(exc: BaseException, secrets: list[str]) -> bool:
    text = "".join(traceback.format_exception(exc))
    return any(s and s in text for s in secrets)
