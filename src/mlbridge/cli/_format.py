"""Output: JSON for machines (one document, or one per line), aligned text tables for people."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from .._protocol.codec import NDArrayPayload

__all__ = [
    "format_bytes",
    "format_duration",
    "render_status",
    "table",
    "to_json",
    "write_json",
]


def _array_list(obj: NDArrayPayload) -> Any:
    values = obj.tolist()
    if values is None:  # complex, strings, datetimes...: dtype, shape and the raw bytes
        return {"dtype": obj.dtype, "shape": list(obj.shape), **_default(obj.data)}
    return values


def _default(obj: Any) -> Any:
    # Arrays (numpy's, or those decoded without numpy) are JSON lists, never a repr string.
    if isinstance(obj, NDArrayPayload):
        return _array_list(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist) and hasattr(obj, "dtype"):
        return tolist()
    if isinstance(obj, bytes | bytearray | memoryview):
        return {"$bytes_base64": base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if isinstance(obj, Mapping):
        return dict(obj)
    return repr(obj)


def to_json(obj: Any, *, indent: int | None = None) -> str:
    """JSON text; arrays become (nested) lists, bytes ``{"$bytes_base64": ...}``, unknown
    objects their ``repr``."""
    return json.dumps(obj, indent=indent, default=_default, ensure_ascii=False)


def write_json(obj: Any, *, indent: int | None = None, stream: TextIO | None = None) -> None:
    out = sys.stdout if stream is None else stream
    out.write(to_json(obj, indent=indent) + "\n")
    out.flush()


def format_bytes(n: int | float | None) -> str:
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"  # pragma: no cover - loop always returns


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds <= 0:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, indent: str = "") -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(indent + line for line in lines)


def render_status(stats: Mapping[str, Any], problems: Mapping[str, str]) -> str:
    """The human ``mlbridge status`` report from a status document (see ``_commands``)."""
    lines = [
        f"host pid {stats.get('host_pid', '-')}  uptime {format_duration(stats.get('uptime'))}  "
        f"default bridge {stats.get('default_bridge') or '-'}",
    ]
    pools: Mapping[str, Any] = stats.get("pools", {})
    if not pools:
        lines.append("no bridges configured")
    for name, pool in pools.items():
        workers: Sequence[Mapping[str, Any]] = pool.get("workers", [])
        core = sum(1 for w in workers if not w.get("overflow"))
        extra = len(workers) - core
        lines.append("")
        lines.append(
            f"{name}: {pool.get('state', '?')}  workers {core}/{pool.get('pool_size', '?')}"
            f" (+{extra} overflow, max {pool.get('overflow', 0)})"
            f"  requests {pool.get('requests', 0)}"
            f"  errors {pool.get('errors', 0)}  restarts {pool.get('restarts', 0)}"
            f"  uptime {format_duration(pool.get('uptime'))}"
        )
        problem = problems.get(name) or pool.get("boot_error")
        if problem:
            lines.append(f"  problem: {problem}")
        if workers:
            rows = [
                [
                    w.get("id", "?"),
                    w.get("pid") or "-",
                    "busy" if w.get("busy") else "idle",
                    format_bytes(w.get("rss_bytes")),
                    w.get("requests", 0),
                    w.get("errors", 0),
                    format_duration(w.get("uptime")),
                    "yes" if w.get("overflow") else "no",
                    w.get("node") or "-",
                    w.get("backend") or "-",
                ]
                for w in workers
            ]
            headers = ["WORKER", "PID", "STATE", "RSS", "REQUESTS", "ERRORS", "UPTIME", "OVERFLOW"]
            headers += ["NODE", "BACKEND"]  # where each worker runs (issue 14)
            lines.append(table(headers, rows, indent="  "))
    return "\n".join(lines)
