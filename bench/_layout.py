"""Run a benchmark module with address-space layout randomisation off (Linux), for stable numbers.

On the VMs these benchmarks run on, the layout a process draws at exec moves a pipe round trip by
up to 60% for the whole life of that process (the same raw echo loop, started twelve times: eleven
at 10-11 µs, one at 17 µs; with the layout fixed, all twelve within 0.3 µs). A run then compares
one lucky or unlucky draw of each process with another. :func:`fixed_layout` re-executes the
module once with ``ADDR_NO_RANDOMIZE`` set (what ``setarch -R`` does); every process the run
starts inherits it, the raw loops and the workers alike. ``--aslr`` (or any failure to set it)
keeps the randomised layout.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["fixed_layout", "layout_note"]

ADDR_NO_RANDOMIZE = 0x0040000
_QUERY = 0xFFFFFFFF  # personality(0xffffffff) reads the current persona without changing it


def _persona() -> int | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        value = libc.personality(_QUERY)
    except (OSError, AttributeError):
        return None
    return None if value < 0 else int(value)


def layout_note() -> str:
    """How this process's address space is laid out, for the results header."""
    persona = _persona()
    if persona is None:
        return "address-space layout: as the platform sets it"
    if persona & ADDR_NO_RANDOMIZE:
        return "address-space layout randomisation off for every process of the run (--aslr: on)"
    return "address-space layout randomised (each process's draw moves its round trip)"


def fixed_layout(module: str, argv: list[str]) -> None:
    """Re-execute ``python -m module argv`` with randomisation off, unless it already is, the
    caller asked for ``--aslr``, or the platform cannot (then return and run as is)."""
    if "--aslr" in argv:
        return
    persona = _persona()
    if persona is None or persona & ADDR_NO_RANDOMIZE:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.personality(persona | ADDR_NO_RANDOMIZE) < 0:
            return
    except (OSError, AttributeError):
        return
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])
