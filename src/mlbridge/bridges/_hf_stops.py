"""Stop strings, shared by the Transformers and llama.cpp generations (no torch here).

The text is cut before the earliest stop string; while streaming, any tail that could be the
start of a stop string is held back until the next piece shows it is not.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["find_stop", "held_back"]


def find_stop(text: str, stops: Sequence[str]) -> int:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else -1


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could start a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
