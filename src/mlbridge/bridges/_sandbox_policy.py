"""What untrusted code in the ``sandbox`` bridge may touch: RestrictedPython plus mlbridge's guards.

:func:`compile_untrusted` compiles with ``compile_restricted`` (which refuses, at compile time,
names and attributes starting with ``_``, frame/generator/traceback/code introspection
attributes, ``exec``/``eval`` statements and the like). :func:`restricted_globals` builds the
namespace the code runs in: a small set of safe builtins (no ``open``, ``type``, ``vars``,
``globals``, ``getattr`` of private names, ``compile``, ``exec``, ``eval``, ``input``), the
guards RestrictedPython's rewritten code calls (``_getattr_``, ``_getitem_``, ``_write_``,
``_getiter_``, ``_inplacevar_``, ``_apply_``, the unpacking guards, ``_print_``), and an
``__import__`` that only imports :data:`ALLOWED_MODULES`. The attribute guard also refuses to hand
out a module that is not on the list (``json.codecs`` would reach ``codecs.open``) and the
``format`` methods of strings (``"{0.__class__}".format(x)``).

This layer stops honest mistakes and the well-known escapes; it is not a security boundary on its
own. The boundary is the worker process: its limits, namespaces and unprivileged user.
"""

from __future__ import annotations

import builtins
import types
from collections.abc import Callable, Iterable
from typing import Any

from RestrictedPython.compile import compile_restricted_exec
from RestrictedPython.Eval import default_guarded_getitem
from RestrictedPython.Guards import (
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safe_builtins,
    safer_getattr,
)
from RestrictedPython.PrintCollector import PrintCollector

__all__ = [
    "ALLOWED_MODULES",
    "SandboxRefusal",
    "compile_untrusted",
    "plain",
    "restricted_globals",
]

#: Modules untrusted code may import (pure computation: no files, processes, network, ctypes).
ALLOWED_MODULES = frozenset(
    {
        "math",
        "cmath",
        "statistics",
        "json",
        "re",
        "itertools",
        "functools",
        "collections",
        "datetime",
        "decimal",
        "fractions",
        "random",
        "heapq",
        "bisect",
        "string",
        "textwrap",
        "unicodedata",
    }
)

_EXTRA_BUILTINS = (
    "range",  # the real one (lazy): memory is bounded by the worker's max_memory instead
    "list",
    "dict",
    "tuple",
    "set",
    "frozenset",
    "sorted",
    "min",
    "max",
    "sum",
    "any",
    "all",
    "enumerate",
    "zip",
    "map",
    "filter",
    "reversed",
    "iter",
    "next",
    "bytes",
    "format",
    "bin",
    "ValueError",
    "TypeError",
    "KeyError",
    "IndexError",
    "ZeroDivisionError",
    "StopIteration",
)


class SandboxRefusal(Exception):  # noqa: N818 - what untrusted code sees: a refusal, not a bug
    """Untrusted code asked for something the sandbox does not allow."""


def compile_untrusted(code: Any, filename: str = "<untrusted>") -> types.CodeType:
    if not isinstance(code, str):
        raise SandboxRefusal(f"code must be a string of Python source, not {type(code).__name__}")
    result = compile_restricted_exec(code, filename=filename)
    if result.errors or result.code is None:
        raise SandboxRefusal("the sandbox refused the code: " + "; ".join(result.errors))
    return result.code


def _guarded_import(
    name: str,
    globals: Any = None,
    locals: Any = None,
    fromlist: Iterable[str] | None = (),
    level: int = 0,
) -> types.ModuleType:
    root = name.partition(".")[0]
    if level != 0 or name not in ALLOWED_MODULES or root != name:
        raise SandboxRefusal(
            f"import of {name!r} is not allowed in the sandbox; allowed modules: "
            + ", ".join(sorted(ALLOWED_MODULES))
        )
    module = __import__(name)
    for item in fromlist or ():
        if not isinstance(item, str) or item.startswith("_"):
            raise SandboxRefusal(f"'from {name} import {item}' is not allowed (private name)")
        try:  # each name goes through the attribute guard (string.Formatter, json.codecs...)
            _guarded_getattr(module, item)
        except AttributeError:
            continue  # Python's own ImportError follows
        except SandboxRefusal as exc:
            raise SandboxRefusal(f"'from {name} import {item}' is not allowed: {exc}") from None
    return module


def _guarded_getattr(obj: Any, name: str, default: Any = None, *rest: Any) -> Any:
    if isinstance(name, str) and name.startswith("_"):
        raise SandboxRefusal(f"access to {name!r} is not allowed in the sandbox (private name)")
    try:
        value = safer_getattr(  # type: ignore[no-untyped-call]
            obj, name, *((default,) if rest or default is not None else ())
        )
    except NotImplementedError as exc:
        raise SandboxRefusal(str(exc)) from None
    if isinstance(value, types.ModuleType) and value.__name__ not in ALLOWED_MODULES:
        raise SandboxRefusal(f"module {value.__name__!r} is not allowed in the sandbox")
    return value


def _getattr_builtin(obj: Any, name: str, *default: Any) -> Any:
    """``getattr()`` for untrusted code: the guarded lookup, with an optional default."""
    if default:
        try:
            return _guarded_getattr(obj, name)
        except AttributeError:
            return default[0]
    return _guarded_getattr(obj, name)


def _guarded_getitem(obj: Any, key: Any) -> Any:
    if isinstance(key, str) and key.startswith("__"):
        raise SandboxRefusal(f"item {key!r} is not allowed in the sandbox (private name)")
    return default_guarded_getitem(obj, key)


_UNTRUSTED_MODULE = "untrusted"  # the __name__ untrusted code runs under


def _write_guard(obj: Any) -> Any:
    """Writes go to dicts, lists and instances of classes the untrusted code defined itself;
    anything else (modules, builtins, library objects) is wrapped by RestrictedPython's guard,
    which refuses them."""
    cls = type(obj)
    if cls in (dict, list) or (
        getattr(cls, "__module__", None) == _UNTRUSTED_MODULE
        and not isinstance(obj, type | types.ModuleType)
    ):
        return obj
    return full_write_guard(obj)


def _guarded_iter(obj: Any) -> Any:
    return obj


def _apply(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return func(*args, **kwargs)


_INPLACE: dict[str, Callable[[Any, Any], Any]] = {
    "+=": lambda a, b: a + b,
    "-=": lambda a, b: a - b,
    "*=": lambda a, b: a * b,
    "/=": lambda a, b: a / b,
    "//=": lambda a, b: a // b,
    "%=": lambda a, b: a % b,
    "**=": lambda a, b: a**b,
    "<<=": lambda a, b: a << b,
    ">>=": lambda a, b: a >> b,
    "|=": lambda a, b: a | b,
    "&=": lambda a, b: a & b,
    "^=": lambda a, b: a ^ b,
}


def _inplacevar(op: str, a: Any, b: Any) -> Any:
    fn = _INPLACE.get(op)
    if fn is None:
        raise SandboxRefusal(f"operator {op!r} is not allowed in the sandbox")
    return fn(a, b)


class _Printed:
    """Collects what ``print`` writes during one run (RestrictedPython's ``_print_``)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def factory(self, _getattr_: Any = None) -> PrintCollector:
        collector = PrintCollector(_getattr_)  # type: ignore[no-untyped-call]
        collector.txt = self.parts  # every print of this run lands in one list
        return collector

    def text(self) -> str:
        return "".join(self.parts)


def restricted_globals(inputs: dict[str, Any] | None = None) -> tuple[dict[str, Any], _Printed]:
    """A fresh namespace for one run (and its print collector)."""
    bi: dict[str, Any] = dict(safe_builtins)
    for name in _EXTRA_BUILTINS:
        bi[name] = getattr(builtins, name)
    bi["__import__"] = _guarded_import
    bi["getattr"] = _getattr_builtin
    bi["hasattr"] = lambda o, n: _hasattr(o, n)
    printed = _Printed()
    g: dict[str, Any] = {
        "__builtins__": bi,
        "__name__": _UNTRUSTED_MODULE,
        "__metaclass__": type,
        "_getattr_": _guarded_getattr,
        "_getitem_": _guarded_getitem,
        "_write_": _write_guard,
        "_getiter_": _guarded_iter,
        "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
        "_unpack_sequence_": guarded_unpack_sequence,
        "_inplacevar_": _inplacevar,
        "_apply_": _apply,
        "_print_": printed.factory,
    }
    for key, value in (inputs or {}).items():
        if not isinstance(key, str) or key.startswith("_"):
            raise SandboxRefusal(f"input name {key!r} is not allowed (names may not start with _)")
        g[key] = value
    return g, printed


def _hasattr(obj: Any, name: str) -> bool:
    try:
        _guarded_getattr(obj, name)
    except (AttributeError, SandboxRefusal):
        return False
    return True


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as plain data for the reply (refuses objects: they could carry references)."""
    if depth > 50:
        raise SandboxRefusal("the result is nested too deeply")
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return value
    if isinstance(value, list | tuple):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, set | frozenset):
        return [plain(v, depth + 1) for v in sorted(value, key=repr)]
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    raise SandboxRefusal(
        f"the code returned a {type(value).__name__}, which is not plain data "
        "(return numbers, strings, lists or dicts)"
    )
