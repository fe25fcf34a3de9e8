"""A test bridge reporting which ``six`` (and which interpreter) its worker sees."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import Any

from mlbridge.bridges.base import BaseBridge


class SixVersionBridge(BaseBridge):
    name = "six_version"

    def _initialize_framework(self) -> None:
        pass

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "six_version", "version": "1.0"}

    def _register_handlers(self) -> None:
        self.register_handler("versions", self._versions)

    def _versions(self, args: dict[str, Any]) -> dict[str, Any]:
        import six

        return {
            "six": six.__version__,
            "six_dist": importlib.metadata.version("six"),
            "prefix": sys.prefix,
            "executable": sys.executable,
            "pid": os.getpid(),
        }
