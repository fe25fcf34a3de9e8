"""The ``sandbox`` bridge: untrusted Python snippets and functions, run with RestrictedPython
inside a worker whose limits and isolation are on by default.

Commands
--------
* ``run`` ``{"code": str, "inputs": {name: value}}`` -> ``{"result", "printed"}``: runs the
  snippet with ``inputs`` as its variables; ``result`` is the snippet's variable ``result``
  (None when it sets none) and ``printed`` what it printed.
* resource type ``function``: ``create_resource("sandbox", "function", {"code": "def f(x): ...",
  "name": "f"})`` compiles once; ``execute_resource(rid, {"args": [...], "kwargs": {...}})``
  calls it, as does ``execute_resource(rid, {"x": 2})`` (inputs without ``args`` / ``kwargs``
  are the keyword arguments); ``name`` may be left out when the code defines one function.
* ``policy`` -> the modules untrusted code may import and the defaults in force.

The code is compiled by :func:`._sandbox_policy.compile_untrusted` and runs in
:func:`._sandbox_policy.restricted_globals`. The worker around it (set up by the host before
this module is imported) has ``max_memory``, ``max_cpu``, ``max_processes``, ``max_open_files``,
``network = false``, an empty environment, a private working directory, a read-only file system
and, when the host runs as root, the unprivileged user ``nobody`` — unless the bridge's options
say otherwise. A refusal is an ``invalid_request`` error naming what was refused.
"""

from __future__ import annotations

import types
from typing import Any

from .._worker.isolate import report as isolation_report
from ..errors import InvalidRequestError
from .base import BaseBridge

__all__ = ["SandboxBridge", "SandboxFunction"]


class SandboxFunction:
    """A compiled untrusted function (the live object of a ``function`` resource)."""

    def __init__(self, code: str, name: str | None) -> None:
        from . import _sandbox_policy as policy

        compiled = policy.compile_untrusted(code, filename="<untrusted function>")
        namespace, self._printed = policy.restricted_globals()
        exec(compiled, namespace)  # restricted code, in the restricted namespace
        found = {
            k: v
            for k, v in namespace.items()
            if isinstance(v, types.FunctionType) and not k.startswith("_")
        }
        if name is None:
            if len(found) != 1:
                names = ", ".join(sorted(found)) or "none"
                raise InvalidRequestError(
                    f"the code must define exactly one function when no 'name' is given "
                    f"(found: {names}); pass 'name'"
                )
            name = next(iter(found))
        if name not in found:
            raise InvalidRequestError(
                f"the code defines no function named {name!r} (found: "
                f"{', '.join(sorted(found)) or 'none'})"
            )
        self.name = name
        self.fn = found[name]
        self.calls = 0

    def __call__(self, inputs: dict[str, Any]) -> Any:
        from ._sandbox_policy import plain

        if "args" in inputs or "kwargs" in inputs:
            args = inputs.get("args", [])
            kwargs = inputs.get("kwargs", {})
        else:  # {"x": 2}: the inputs are the keyword arguments
            args, kwargs = [], inputs
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise InvalidRequestError(
                "inputs are {'args': [...], 'kwargs': {...}}, or the keyword arguments "
                "themselves ({'x': 2})"
            )
        self.calls += 1
        return plain(self.fn(*args, **kwargs))


class SandboxBridge(BaseBridge):
    name = "sandbox"

    def _initialize_framework(self) -> None:
        import importlib

        from . import _sandbox_policy

        # Imported now, as the host's user: the worker then runs as nobody, who may not be able
        # to read the interpreter's library (and untrusted code imports from this list only).
        for name in sorted(_sandbox_policy.ALLOWED_MODULES):
            importlib.import_module(name)

    def get_framework_info(self) -> dict[str, Any]:
        from importlib.metadata import version

        try:
            rp = version("RestrictedPython")
        except Exception:
            rp = "unknown"
        return {"name": "sandbox", "version": rp, "engine": "RestrictedPython"}

    def _register_handlers(self) -> None:
        from ._sandbox_policy import SandboxRefusal

        self.register_handler("run", self._guard(self._run))
        self.register_handler("policy", self._policy)
        from .base import ResourceType

        self.register_resource_type(
            ResourceType(
                "function",
                create=self._guard2(
                    lambda cfg, state: SandboxFunction(
                        str(cfg.get("code", "")), cfg.get("name") and str(cfg["name"])
                    )
                ),
                execute=self._guard2(lambda fn, inputs: fn(inputs)),
                describe=lambda fn: {"function": fn.name, "calls": fn.calls},
            )
        )
        self._refusal = SandboxRefusal

    def _refused(self, exc: BaseException) -> InvalidRequestError:
        return InvalidRequestError(f"sandbox: {exc}")

    def _guard(self, fn: Any) -> Any:
        def wrapped(args: dict[str, Any]) -> Any:
            try:
                return fn(args)
            except self._refusal as exc:
                raise self._refused(exc) from None

        return wrapped

    def _guard2(self, fn: Any) -> Any:
        def wrapped(a: Any, b: Any) -> Any:
            try:
                return fn(a, b)
            except self._refusal as exc:
                raise self._refused(exc) from None

        return wrapped

    def _run(self, args: dict[str, Any]) -> dict[str, Any]:
        from . import _sandbox_policy as policy

        code = policy.compile_untrusted(args.get("code"), filename="<untrusted snippet>")
        inputs = args.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise InvalidRequestError("'inputs' must be a mapping of variable names to values")
        namespace, printed = policy.restricted_globals(inputs)
        exec(code, namespace)  # restricted code, in the restricted namespace
        return {"result": policy.plain(namespace.get("result")), "printed": printed.text()}

    def _policy(self, args: dict[str, Any]) -> dict[str, Any]:
        from ._sandbox_policy import ALLOWED_MODULES

        return {"allowed_modules": sorted(ALLOWED_MODULES), "isolation": isolation_report()}
