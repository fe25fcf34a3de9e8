"""Bridge-wide state: configuration every worker of a pool must have (DSPy's LM, a default model).

Theory of operation
-------------------
A worker's handler calls ``set_bridge_state(key, value)``; its success reply carries
``"bridge_state": {key: value}``. The host records it here, per bridge, like a host-owned
resource: the record is the truth and each worker's copy is a cache tagged with the
:attr:`BridgeState.version` it last applied. Before a worker runs its next call (and before a
new worker, replacement or overflow, takes its first call) the host sends it
``apply_bridge_state`` with the whole record when its version is behind. So every worker of the
pool behaves the same whoever served the ``configure`` call, and a crash loses nothing.

Owned by the host's event loop (read and written only there). Values are kept as given; they
may hold secrets (API keys), so nothing here is ever put into statistics or logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BridgeState"]


@dataclass(slots=True)
class BridgeState:
    values: dict[str, Any] = field(default_factory=dict)
    version: int = 0

    def record(self, changes: Any) -> int:
        """Merge a reply's ``bridge_state`` into the record; return the new version (0: none)."""
        if not isinstance(changes, dict) or not changes:
            return 0
        self.values.update(changes)
        self.version += 1
        return self.version

    def due(self, applied: int) -> dict[str, Any] | None:
        """The state to send to a worker that last applied version ``applied`` (None: current)."""
        if applied >= self.version or not self.values:
            return None
        return dict(self.values)

    def keys(self) -> list[str]:
        return sorted(self.values)
