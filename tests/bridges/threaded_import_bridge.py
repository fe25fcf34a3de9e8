"""A bridge whose import starts a thread: forking after that is unsafe (test_fork_start.py)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from mlbridge.bridges.base import BaseBridge

threading.Thread(target=lambda: time.sleep(3600), daemon=True, name="import-time").start()


class ThreadedImportBridge(BaseBridge):
    name = "threaded"

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "threaded", "version": "1"}

    def _register_handlers(self) -> None:
        self.register_handler("ids", lambda a: {"pid": os.getpid(), "ppid": os.getppid()})
