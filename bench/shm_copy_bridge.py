"""A bridge for bench/shm_bench.py: ``copy`` returns a new array equal to the one it got.

So the reply cannot go back as a handle of the request's segment: the worker writes its own
(the second copy of a round trip), unlike the built-in echo, which returns what it received.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlbridge.bridges.base import BaseBridge


class ShmCopyBridge(BaseBridge):
    name = "shmcopy"

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "shmcopy", "version": "1"}

    def _register_handlers(self) -> None:
        self.register_handler("copy", lambda a: {"a": np.array(a["a"], copy=True)})
