"""mlbridge: run ML frameworks side by side in supervised worker processes.

>>> from mlbridge import MLBridge
>>> with MLBridge() as bridge:
...     bridge.execute("echo", "echo", {"hello": "world"})
{'hello': 'world'}

The names below are imported on first use (PEP 562): a worker process imports this package for
:class:`BaseBridge` and must not pay for, or depend on, the host (asyncio, pools, config).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

# A library never configures logging, and must not have its warnings printed through logging's
# last-resort handler when the application configured none (worker kills are logged as
# warnings on "mlbridge.*"). Configure logging, or add a handler to "mlbridge", to see them.
logging.getLogger("mlbridge").addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from . import errors
    from ._api import AsyncMLBridge, AsyncSession, MLBridge, Session
    from ._host.telemetry import HealthEvent, RequestEvent, WorkerEvent
    from .bridges.base import BaseBridge, CallContext, ResourceType
    from .config import BridgeConfig, BridgeOptions, MLBridgeConfig, bridge_config

__all__ = [
    "AsyncMLBridge",
    "AsyncSession",
    "BaseBridge",
    "BridgeConfig",
    "BridgeOptions",
    "CallContext",
    "HealthEvent",
    "MLBridge",
    "MLBridgeConfig",
    "RequestEvent",
    "ResourceType",
    "Session",
    "WorkerEvent",
    "__version__",
    "bridge_config",
    "errors",
]
__version__ = "0.1.0"

_LAZY = {
    "AsyncMLBridge": "._api",
    "AsyncSession": "._api",
    "MLBridge": "._api",
    "Session": "._api",
    "HealthEvent": "._host.telemetry",
    "RequestEvent": "._host.telemetry",
    "WorkerEvent": "._host.telemetry",
    "BaseBridge": ".bridges.base",
    "CallContext": ".bridges.base",
    "ResourceType": ".bridges.base",
    "BridgeConfig": ".config",
    "BridgeOptions": ".config",
    "MLBridgeConfig": ".config",
    "bridge_config": ".config",
}


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module(".errors", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mlbridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
