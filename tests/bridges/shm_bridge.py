"""A test bridge for shared-memory lifetimes: it keeps, changes and makes numpy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlbridge.bridges.base import BaseBridge


class ShmBridge(BaseBridge):
    name = "shmtest"

    def _initialize_framework(self) -> None:
        self.kept: list[Any] = []

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "shmtest", "version": "1.0"}

    def _register_handlers(self) -> None:
        r = self.register_handler
        r("echo", lambda a: a)
        r("keep", self._keep)  # hold a view of the received array (a slice, like a cache would)
        r("kept", lambda a: [float(k.sum()) for k in self.kept])
        r("kept_arrays", lambda a: list(self.kept))
        r("drop", lambda a: self.kept.clear())
        r("touch", self._touch)  # write into the received view, then send it back
        r("make", lambda a: np.full(int(a["n"]), float(a["value"])))
        r("copy", lambda a: np.array(a["a"], copy=True))

    def _keep(self, args: dict[str, Any]) -> Any:
        arr = args["a"]
        self.kept.append(arr[1:] if args.get("slice") else arr)
        return float(arr.sum()) if not args.get("back") else arr

    def _touch(self, args: dict[str, Any]) -> Any:
        arr = args["a"]
        arr[int(args.get("at", 0))] = float(args["value"])
        return arr
