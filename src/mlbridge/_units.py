"""Sizes as people write them: ``format_size(2_000_000_000) == "2GB"``, the inverse of the
config's size parser for the values people use (so an error quotes a limit as it was set)."""

from __future__ import annotations

__all__ = ["format_size"]

_UNITS = (
    (1024**4, "TiB"),
    (10**12, "TB"),
    (1024**3, "GiB"),
    (10**9, "GB"),
    (1024**2, "MiB"),
    (10**6, "MB"),
    (1024, "KiB"),
    (10**3, "KB"),
)


def format_size(n: int) -> str:
    """The largest unit that divides ``n`` exactly (``"256MiB"``, ``"2GB"``); else the decimal
    megabytes with the exact bytes (``"1.5MB (1500001 bytes)"``)."""
    n = int(n)
    if n <= 0:
        return f"{n}B"
    for size, unit in _UNITS:
        if n % size == 0:
            return f"{n // size}{unit}"
    return f"{n / 1e6:.1f}MB ({n} bytes)" if n >= 10**6 else f"{n}B"
