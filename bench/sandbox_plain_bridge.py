"""The baseline of bench/sandbox_bench.py: a ``function`` resource run as plain Python.

Trusted code only: the source is ``exec``-ed unrestricted in an ordinary worker.
"""

from __future__ import annotations

from typing import Any

from mlbridge.bridges.base import BaseBridge, ResourceType


def _compile(cfg: dict[str, Any], state: Any) -> Any:
    namespace: dict[str, Any] = {}
    exec(str(cfg["code"]), namespace)  # trusted benchmark code (the baseline)
    return namespace[str(cfg["name"])]


class PlainFunctionBridge(BaseBridge):
    name = "plain"

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "plain", "version": "1"}

    def _register_handlers(self) -> None:
        self.register_resource_type(
            ResourceType(
                "function",
                create=_compile,
                execute=lambda fn, inputs: fn(*inputs.get("args", []), **inputs.get("kwargs", {})),
            )
        )
