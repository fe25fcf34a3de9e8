"""A test bridge returning numpy arrays (for the CLI's JSON output)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlbridge.bridges.base import BaseBridge


class ArraysBridge(BaseBridge):
    name = "arrays"

    def _initialize_framework(self) -> None:
        pass

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "arrays", "version": "1.0"}

    def _register_handlers(self) -> None:
        self.register_handler(
            "arrays",
            lambda a: {
                "matrix": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
                "ids": np.array([3, 1, 2], dtype=np.int64),
                "scalar": np.float32(1.5),
            },
        )
