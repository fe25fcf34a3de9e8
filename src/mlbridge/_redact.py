"""Keep secrets out of reprs, log lines, error messages and statistics.

Two tools, both pure (no I/O, no mlbridge imports, so config, host, worker and CLI can all use
them):

- :func:`redact` copies a mapping with the value of every secret-looking key replaced by
  ``"***"``, recursively through nested mappings, lists and tuples. A key looks secret when,
  ignoring case, it contains ``key``, ``token``, ``secret``, ``password``, ``passwd``,
  ``credential`` or ``authorization`` — except where that word is part of a well-known harmless
  name (``tokenizer``, ``max_tokens``/``max_new_tokens`` and other token counts, ``keyword``), so
  that ``repr()`` still shows which tokenizer a bridge loads. ``None``, ``""`` and booleans are
  shown as they are: "not set" is not a secret.
- :func:`redact_text` removes known secret values from free text (a command line, an exception
  message, a worker's stderr); :func:`secret_values` collects those values from a mapping.

>>> redact({"model": "gpt-4o", "api_key": "sk-123", "headers": {"Authorization": "Bearer x"}})
{'model': 'gpt-4o', 'api_key': '***', 'headers': {'Authorization': '***'}}
>>> redact_text("call failed for key sk-12345", secret_values({"api_key": "sk-12345"}))
'call failed for key ***'
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["MASK", "is_secret_key", "redact", "redact_text", "secret_values"]

MASK = "***"

_SECRET = re.compile(r"key|token|secret|password|passwd|credential|authorization", re.IGNORECASE)
# Names that contain a secret word but never hold a secret; removed before the check above.
_HARMLESS = re.compile(
    r"tokeniz(?:er|ers|ation)"
    r"|(?:max|min|num|n|total|prompt|completion|context)_?(?:new_?)?tokens"
    r"|keywords?",
    re.IGNORECASE,
)
# Shorter values are not searched for in free text: masking every "ab" would destroy it.
_MIN_SECRET_CHARS = 4


def is_secret_key(key: object) -> bool:
    """Whether a value stored under ``key`` is treated as a secret."""
    return isinstance(key, str) and _SECRET.search(_HARMLESS.sub("", key)) is not None


def _shown(value: Any) -> bool:
    return value is None or value == "" or isinstance(value, bool)


def redact(value: Any) -> Any:
    """A copy of ``value`` (typically a mapping) with secret-looking keys' values masked.

    Mappings become plain dicts; lists and tuples keep their type; anything else is returned as
    it is (only values under a secret-looking key are ever replaced).
    """
    if isinstance(value, Mapping):
        return {
            k: (v if _shown(v) else MASK) if is_secret_key(k) else redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)
    return value


def secret_values(value: Any) -> list[str]:
    """Every string found under a secret-looking key of ``value`` (at any depth), for
    :func:`redact_text`."""
    found: list[str] = []

    def leaves(v: Any) -> None:
        if isinstance(v, str):
            found.append(v)
        elif isinstance(v, Mapping):
            for x in v.values():
                leaves(x)
        elif isinstance(v, list | tuple):
            for x in v:
                leaves(x)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            found.append(str(v))

    def walk(v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                if is_secret_key(k):
                    leaves(x)
                else:
                    walk(x)
        elif isinstance(v, list | tuple):
            for x in v:
                walk(x)

    walk(value)
    return found


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret value replaced by ``"***"`` (longest
    first, so a secret that contains another is masked whole), also in its JSON-escaped,
    repr-escaped and repr-of-JSON spellings. Values shorter than four characters are left
    in place."""
    forms: set[str] = set()
    for s in secrets:
        if len(s) >= _MIN_SECRET_CHARS:
            # Also as it appears in JSON text, a repr, and a repr of JSON (a logged argv).
            as_json = json.dumps(s)[1:-1]
            forms.update((s, as_json, repr(s)[1:-1], repr(as_json)[1:-1]))
    values = sorted(forms, key=len, reverse=True)
    if not values:
        return text
    return re.sub("|".join(re.escape(s) for s in values), MASK, text)
