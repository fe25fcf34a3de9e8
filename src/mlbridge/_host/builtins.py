"""The built-in bridges as the host sees them: name -> worker class path, and what each needs.

The names and class paths live in :mod:`mlbridge._builtin_bridges`, shared with the worker
runtime (neither may import the other). Nothing here imports a framework: availability is probed
with :func:`importlib.util.find_spec` only.
"""

from __future__ import annotations

import importlib.util
from types import MappingProxyType

from .._builtin_bridges import BUILTIN_BRIDGES

__all__ = [
    "BUILTIN_BRIDGES",
    "BUILTIN_OPTION_DEFAULTS",
    "BUILTIN_POOL_DEFAULTS",
    "BUILTIN_REQUIREMENTS",
    "builtin_available",
    "builtin_module",
    "is_builtin",
    "module_importable",
]

# Import names (not distribution names) each built-in needs in the worker's interpreter.
BUILTIN_REQUIREMENTS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType(
    {
        "echo": (),
        "transformers": ("torch", "transformers", "sentence_transformers"),
        "dspy": ("dspy",),
        "langchain": ("langchain_core",),
        "sandbox": ("RestrictedPython",),
    }
)


# Pool sizes of the built-ins where they differ from 1 + 0 (as in the original design): DSPy
# programs are many and short, LangChain chains fewer and longer.
BUILTIN_POOL_DEFAULTS: MappingProxyType[str, dict[str, int]] = MappingProxyType(
    {
        "dspy": {"pool_size": 4, "overflow": 2},
        "langchain": {"pool_size": 2, "overflow": 1},
    }
)


# Options of the built-ins where they differ from BridgeOptions' defaults (as in the original
# design, LangChain's chains and agent loops get a longer per-call timeout). An explicit
# ``options`` table still wins key by key.
BUILTIN_OPTION_DEFAULTS: MappingProxyType[str, dict[str, float]] = MappingProxyType(
    {
        "langchain": {"timeout": 120.0},
    }
)


def is_builtin(name: str) -> bool:
    return name in BUILTIN_BRIDGES


def builtin_module(name: str) -> str:
    """The module part of a built-in's class path (``echo`` -> ``mlbridge.bridges.echo``)."""
    return BUILTIN_BRIDGES[name].partition(":")[0]


def module_importable(name: str) -> bool:
    """Whether ``name`` can be found by *this* interpreter, without importing it.

    For a dotted name the parent packages are imported (that is how ``find_spec`` works), so
    callers pass top-level framework names, or ``mlbridge.*`` whose parents are already loaded.
    """
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def builtin_available(name: str) -> bool:
    """A built-in is available here when its bridge module ships and its packages are installed."""
    return module_importable(builtin_module(name)) and all(
        module_importable(pkg) for pkg in BUILTIN_REQUIREMENTS[name]
    )
