"""``run_python``: the sandbox bridge as a tool for code running inside a worker.

Give it to a DSPy ReAct program by import path (``"tools": ["mlbridge.bridges.sandbox_tool:
run_python"]``) or call it from any bridge's handler: it calls the ``sandbox`` bridge through the
host (a call-back), so the untrusted code runs in the sandbox's worker, never in the caller's.
"""

from __future__ import annotations

from .._worker.host_client import current
from ..errors import MLBridgeError

__all__ = ["SANDBOX_BRIDGE", "run_python"]

SANDBOX_BRIDGE = "sandbox"


def run_python(code: str) -> str:
    """Run Python code in a sandbox (no files, network or os); assign `result` to return a
    value. Returns the result followed by what the code printed, or the error."""
    try:
        out = current().call(SANDBOX_BRIDGE, "run", {"code": code})
    except MLBridgeError as exc:  # refused, or stopped by a limit: the caller (a model) reads why
        return f"error: {exc}"
    return f"{out['result']}{out['printed']}"
