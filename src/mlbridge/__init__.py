"""mlbridge: run ML frameworks side by side in supervised worker processes.

>>> from mlbridge import MLBridge
>>> with MLBridge() as bridge:
...     bridge.execute("echo", "echo", {"hello": "world"})
{'hello': 'world'}
"""

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
