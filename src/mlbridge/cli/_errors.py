"""Exit codes and the one place where an exception becomes a message on stderr.

Each error kind has its own exit code, so scripts can tell "fix your config" from "the worker
crashed" without parsing text:

====  =================================================================================
code  meaning
====  =================================================================================
0     success (``doctor``: healthy; ``status``: every pool ready)
1     ``doctor`` found problems / ``status`` found a broken pool / an unexpected error
2     usage: unknown option, bad ``json-args``
3     configuration: the config file or ``MLBRIDGE_*`` variables are invalid
4     no bridge of that name is configured
5     the worker answered with a failure (bad arguments, unknown command, model error...)
6     timeout: the call ran past ``--timeout`` or no worker was free in time
7     the worker process crashed while holding the call
8     the bridge cannot take calls (it is broken: its workers fail to boot)
9     protocol error between host and worker
130   interrupted (Ctrl-C)
====  =================================================================================
"""

from __future__ import annotations

import sys
from typing import Final, TextIO

from ..errors import (
    BridgeError,
    BridgeUnavailableError,
    ConfigError,
    FrameworkNotFoundError,
    MLBridgeError,
    MLBridgeTimeoutError,
    ProtocolError,
    WorkerCrashedError,
)

__all__ = [
    "EXIT_BRIDGE_ERROR",
    "EXIT_CONFIG",
    "EXIT_CRASHED",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_PROTOCOL",
    "EXIT_TIMEOUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "UsageError",
    "exit_code_for",
    "report",
]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONFIG: Final = 3
EXIT_NOT_FOUND: Final = 4
EXIT_BRIDGE_ERROR: Final = 5
EXIT_TIMEOUT: Final = 6
EXIT_CRASHED: Final = 7
EXIT_UNAVAILABLE: Final = 8
EXIT_PROTOCOL: Final = 9
EXIT_INTERRUPTED: Final = 130

# Most specific first: the first isinstance match wins.
_CODES: Final[tuple[tuple[type[BaseException], int], ...]] = (
    (ConfigError, EXIT_CONFIG),
    (FrameworkNotFoundError, EXIT_NOT_FOUND),
    (MLBridgeTimeoutError, EXIT_TIMEOUT),
    (WorkerCrashedError, EXIT_CRASHED),
    (BridgeUnavailableError, EXIT_UNAVAILABLE),
    (ProtocolError, EXIT_PROTOCOL),
    (BridgeError, EXIT_BRIDGE_ERROR),
)

_TITLES: Final[dict[int, str]] = {
    EXIT_USAGE: "usage error",
    EXIT_CONFIG: "configuration error",
    EXIT_NOT_FOUND: "unknown bridge",
    EXIT_BRIDGE_ERROR: "the bridge failed",
    EXIT_TIMEOUT: "timeout",
    EXIT_CRASHED: "worker crashed",
    EXIT_UNAVAILABLE: "bridge unavailable",
    EXIT_PROTOCOL: "protocol error",
}

_FIXES: Final[dict[int, str]] = {
    EXIT_CONFIG: "correct the key named above, then check with `mlbridge doctor`",
    EXIT_NOT_FOUND: "run `mlbridge list` to see the configured bridges",
    EXIT_TIMEOUT: "raise --timeout (or the bridge's timeout option), or check the worker "
    "with `mlbridge status`",
    EXIT_CRASHED: "see the exit status and stderr above; `mlbridge doctor` checks the bridge's "
    "environment",
    EXIT_UNAVAILABLE: "run `mlbridge doctor` to find why its workers do not boot",
    EXIT_PROTOCOL: "the worker and host disagree on the wire format; make sure both run the "
    "same mlbridge version",
    EXIT_BRIDGE_ERROR: "check the command and its arguments; `mlbridge call <bridge> "
    "list_commands` lists what the bridge supports",
}


class UsageError(Exception):
    """The command line itself is wrong (exit code 2)."""


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_FAILURE


def report(exc: BaseException, stream: TextIO | None = None) -> int:
    """Write ``exc`` as ``mlbridge: <kind>: <message>`` (plus a fix) and return its exit code."""
    out = sys.stderr if stream is None else stream
    code = exit_code_for(exc)
    if isinstance(exc, KeyboardInterrupt):
        print("mlbridge: interrupted", file=out)
        return code
    title = _TITLES.get(code, "error")
    text = str(exc) or type(exc).__name__
    if isinstance(exc, MLBridgeError) and exc.remote_type:
        text = f"{exc.remote_type} in the worker: {text}"
    elif not isinstance(exc, MLBridgeError | UsageError):
        text = f"{type(exc).__name__}: {text}"
    print(f"mlbridge: {title}: {text}", file=out)
    fix = _FIXES.get(code)
    if fix and "Fix:" not in text and "fix:" not in text:
        print(f"  fix: {fix}", file=out)
    return code
