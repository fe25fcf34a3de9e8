"""Framework bridges. Each runs inside a worker process; import :class:`BaseBridge` to write one."""

from .base import BaseBridge, CallContext, ResourceType

__all__ = ["BaseBridge", "CallContext", "ResourceType"]
