"""Every config error in a file at once: a collector the loader reports errors to.

Theory of operation
-------------------
:func:`collecting` (used by the loader around one whole config) installs a list in a context
variable. While it is installed, :func:`report` appends an error instead of raising it, so the
loader checks every key of every bridge and reports each bad one; :func:`checkpoint` then stops
the current unit (one bridge, one options table) with :class:`UnitAbortedError` when that unit had
errors, because its cross-checks would only repeat them. The collector turns what it gathered
into one :class:`~mlbridge.errors.ConfigError`: the error itself when there is one (messages
unchanged), else one listing them all, each with its key path and fix (``details["errors"]``).

Outside :func:`collecting` (a ``BridgeConfig`` built in code) :func:`report` raises at once, as
before: the first error wins.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from .errors import ConfigError

__all__ = ["UnitAbortedError", "checkpoint", "collecting", "combine", "report"]

_ERRORS: contextvars.ContextVar[list[ConfigError] | None] = contextvars.ContextVar(
    "mlbridge_config_errors", default=None
)


class UnitAbortedError(ConfigError):
    """A unit (bridge, options table) stopped after its errors were collected; never escapes
    :func:`collecting`."""


def report(exc: ConfigError) -> None:
    """Collect ``exc`` when a collector is installed, else raise it."""
    errors = _ERRORS.get()
    if errors is None:
        raise exc
    if isinstance(exc, UnitAbortedError):  # a unit inside this one stopped: its errors are in
        return
    if not any(str(e) == str(exc) for e in errors):
        errors.append(exc)


def mark() -> int:
    """How many errors are collected so far (0 outside a collector)."""
    errors = _ERRORS.get()
    return 0 if errors is None else len(errors)


def checkpoint(since: int) -> None:
    """Stop the current unit when errors were collected after ``since`` (see :func:`mark`)."""
    if mark() > since:
        raise UnitAbortedError("(collected)")


@contextlib.contextmanager
def collecting(source: str | None) -> Iterator[list[ConfigError]]:
    """Collect errors in the block; raise them together (:func:`combine`) at its end."""
    outer = _ERRORS.get()
    if outer is not None:  # nested: the outer collector gathers and raises
        yield outer
        return
    errors: list[ConfigError] = []
    token = _ERRORS.set(errors)
    try:
        try:
            yield errors
        except UnitAbortedError:
            pass
        except ConfigError as exc:
            errors.append(exc)
    finally:
        _ERRORS.reset(token)
    if errors:
        raise combine(errors, source)


def combine(errors: list[ConfigError], source: str | None) -> ConfigError:
    """One error for many: the error itself when alone, else a numbered list of all."""
    if len(errors) == 1:
        return errors[0]
    where = f"{source}: " if source else ""
    lines = "\n".join(f"  {i}. {e}" for i, e in enumerate(errors, 1))
    listed: list[dict[str, Any]] = [
        {
            "key_path": e.details.get("key_path"),
            "message": str(e),
            "fix": e.details.get("fix"),
        }
        for e in errors
    ]
    first = errors[0].details
    return ConfigError(
        f"{where}{len(errors)} errors in the config (all listed; fix each, then load again):\n"
        f"{lines}",
        key_path=first.get("key_path"),
        fix=first.get("fix"),
        source=source,
        errors=listed,
    )
