"""The HTTP gateway: REST + SSE, OpenAI-compatible ``/v1``, health (see :mod:`.app`).

``create_app(bridge, settings)`` (in :mod:`.app`) builds the FastAPI app; :func:`serve` (in
:mod:`.server`) serves it, for ``mlbridge serve`` and for a host in your own program (``await
serve(bridge, GatewaySettings(port=...))``), and writes the run-time file through which
``mlbridge call`` / ``status`` / ``restart`` find it (:mod:`.runtime_file`). FastAPI and uvicorn
are imported only when :func:`serve` or those submodules are used, so ``mlbridge.gateway`` and
``mlbridge.gateway.runtime_file`` work without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlbridge._config_gateway import GatewaySettings

if TYPE_CHECKING:
    from .server import serve

__all__ = ["GatewaySettings", "serve"]


def __getattr__(name: str) -> Any:
    if name == "serve":  # imports FastAPI and uvicorn (the gateway extra)
        from .server import serve

        return serve
    raise AttributeError(f"module 'mlbridge.gateway' has no attribute {name!r}")
