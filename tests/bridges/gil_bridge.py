"""A test bridge whose ``gil`` command holds the GIL (a C call made without releasing it)."""

from __future__ import annotations

import ctypes
from typing import Any

from mlbridge.bridges.base import BaseBridge


class GilBridge(BaseBridge):
    name = "gil"

    def _initialize_framework(self) -> None:
        # PyDLL keeps the GIL held during the call, like a regex or a C extension would.
        self._libc = ctypes.PyDLL(None)

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "gil", "version": "1.0"}

    def _register_handlers(self) -> None:
        self.register_handler("gil", self._gil)

    def _gil(self, args: dict[str, Any]) -> dict[str, Any]:
        self._libc.sleep(int(args.get("seconds", 5)))
        return {"held": True}
