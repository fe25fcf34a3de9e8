"""The HTTP gateway: REST + SSE, OpenAI-compatible ``/v1``, health (see :mod:`.app`).

``create_app(bridge, settings)`` (in :mod:`.app`) builds the FastAPI app; :mod:`.server` serves
it (``mlbridge serve``); :mod:`.runtime_file` lets other commands find a running gateway.
FastAPI and uvicorn are imported only by those submodules, so ``mlbridge.gateway`` and
``mlbridge.gateway.runtime_file`` work without them.
"""

from mlbridge._config_gateway import GatewaySettings

__all__ = ["GatewaySettings"]
