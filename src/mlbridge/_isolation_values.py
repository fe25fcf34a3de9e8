"""Config values of the OS-enforced limits and isolation options (issue 16).

``max_cpu`` is a share of one CPU written ``"50%"`` / ``"200%"`` (a plain number is a percentage);
``max_processes`` and ``max_open_files`` are counts; ``network``, ``private_tmp`` and
``read_only`` are booleans or unset (unset: the bridge's default, on for the ``sandbox`` bridge,
off otherwise); ``env_allowlist`` lists the host variables a worker inherits (unset: all of them,
except for the ``sandbox`` bridge, which inherits none).
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

from ._config_values import ENV_NAME_RE, Ctx, as_bool, as_int, as_str_tuple, type_error

__all__ = ["ISOLATION_VALIDATORS", "as_cpu_share", "format_cpu"]

CPU_HELP: Final = 'write a percentage of one CPU such as "50%" or "200%" (a number is a percentage)'
_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*%\s*")


def as_cpu_share(ctx: Ctx, path: str, v: Any) -> float | None:
    """``"50%"`` -> 50.0 (percent of one CPU); a number is a percentage too (idempotent)."""
    if v is None:
        return None
    if isinstance(v, str):
        m = _PERCENT.fullmatch(v)
        if m is None:
            raise ctx.error(path, "is not a CPU share", CPU_HELP, v)
        percent = float(m.group(1))
    elif isinstance(v, bool) or not isinstance(v, int | float):
        raise type_error(ctx, path, "a CPU share", CPU_HELP + " (or leave it out)", v)
    else:
        percent = float(v)
    if not math.isfinite(percent) or percent < 1.0:
        raise ctx.error(path, "must be at least 1% of a CPU", CPU_HELP, v)
    return percent


def format_cpu(percent: float) -> str:
    return f"{percent:g}%"


def _opt_bool(ctx: Ctx, path: str, v: Any) -> bool | None:
    return None if v is None else as_bool(ctx, path, v)


def _opt_names(ctx: Ctx, path: str, v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    return as_str_tuple(ctx, path, v, ENV_NAME_RE, "variable names", "LANG")


ISOLATION_VALIDATORS: Final = {
    "max_cpu": as_cpu_share,
    "max_processes": lambda c, p, v: as_int(c, p, v, minimum=1, optional=True),
    "max_open_files": lambda c, p, v: as_int(c, p, v, minimum=16, optional=True),
    "network": _opt_bool,
    "env_allowlist": _opt_names,
    "private_tmp": _opt_bool,
    "read_only": _opt_bool,
}
