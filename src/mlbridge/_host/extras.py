"""Which built-in bridges ship in this mlbridge, and the extra that installs each one's packages.

Both are derived, never listed by hand: the names come from
:data:`mlbridge._builtin_bridges.BUILTIN_BRIDGES` (a bridge *ships* when its module is found in
this installation), the extras from the installed distribution's metadata (``Provides-Extra``;
a built-in whose name is an extra, e.g. ``mlbridge[dspy]``, installs with it). Nothing here
imports a framework or a bridge module.
"""

from __future__ import annotations

import functools
import importlib.metadata

from .builtins import BUILTIN_BRIDGES, BUILTIN_REQUIREMENTS, module_importable

__all__ = ["builtin_extra", "install_hint", "shipped_builtins"]


def shipped_builtins() -> list[str]:
    """Built-in bridge names whose bridge module is part of this mlbridge installation."""
    return [
        name for name, path in BUILTIN_BRIDGES.items() if module_importable(path.partition(":")[0])
    ]


@functools.cache
def _extras() -> frozenset[str]:
    try:
        found = importlib.metadata.metadata("mlbridge").get_all("Provides-Extra") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return frozenset()
    return frozenset(found)


def builtin_extra(name: str) -> str | None:
    """The ``mlbridge[...]`` extra that installs built-in ``name``'s packages, if there is one."""
    return name if name in BUILTIN_BRIDGES and name in _extras() else None


def install_hint(name: str, python: str = "python") -> str:
    """The command that installs what built-in ``name`` needs, for ``python``."""
    extra = builtin_extra(name)
    if extra is not None:
        return f"{python} -m pip install 'mlbridge[{extra}]'"
    packages = [p.replace("_", "-") for p in BUILTIN_REQUIREMENTS.get(name, ())]
    if not packages:
        return "nothing to install"
    return f"{python} -m pip install {' '.join(packages)}"
