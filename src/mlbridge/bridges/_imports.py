"""``pkg.mod:name`` import paths in bridge specs (a model class, a factory, a tool)."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import InvalidConfigurationError

__all__ = ["import_object"]


def import_object(path: Any, what: str) -> Any:
    """``pkg.mod:name`` (or ``pkg.mod.name``) -> the object; a clear error when it is not there."""
    if not isinstance(path, str) or not path.strip():
        raise InvalidConfigurationError(
            f"{what} must be an import path such as 'pkg.mod:name', got {path!r}"
        )
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise InvalidConfigurationError(f"{what} {path!r} must look like 'pkg.mod:name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidConfigurationError(
            f"{what} {path!r}: cannot import module {module_name!r} in the worker ({exc}); "
            "is it installed, or on the bridge's PYTHONPATH (bridges.<name>.env)?"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise InvalidConfigurationError(
                f"{what} {path!r}: module {module_name!r} has no {attr!r}"
            ) from exc
    return obj
