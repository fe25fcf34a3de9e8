"""Stop strings and the chat result, shared by the Transformers and llama.cpp generations (no
torch here).

The text is cut before the earliest stop string; while streaming, any tail that could be the
start of a stop string is held back until the next piece shows it is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["chat_result", "find_stop", "held_back"]


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


def chat_result(
    model: str, text: str, finish_reason: str, prompt_tokens: int, completion: int, seconds: float
) -> dict[str, Any]:
    """The reply of ``chat`` / ``generate``, the same for every runtime."""
    return {
        "model": model,
        "message": {"role": "assistant", "content": text},
        "text": text,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        },
        "timing": {
            "seconds": round(seconds, 4),
            "tokens_per_second": round(completion / seconds, 2) if seconds > 0 else None,
        },
    }
