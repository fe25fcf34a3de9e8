"""mlbridge: run ML frameworks side by side in supervised worker processes."""

from . import errors
from .bridges.base import BaseBridge, CallContext, ResourceType

__all__ = ["BaseBridge", "CallContext", "ResourceType", "__version__", "errors"]
__version__ = "0.1.0"
