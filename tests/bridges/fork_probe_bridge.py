"""Bridges for the fork-start tests (test_fork_start.py): where they were imported and set up.

``FORK_PROBE_LOG`` names a file; each import of this module appends ``import <pid>`` to it and
each bridge set-up ``init <pid>``, so a test can tell the template's import from the workers'.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from mlbridge.bridges.base import BaseBridge


def _record(what: str) -> None:
    path = os.environ.get("FORK_PROBE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{what} {os.getpid()}\n")


_record("import")


class ForkProbeBridge(BaseBridge):
    name = "forkprobe"

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "forkprobe", "version": "1"}

    def _initialize_framework(self) -> None:
        _record("init")

    def _register_handlers(self) -> None:
        self.register_handler("ids", self._ids)

    def _ids(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "pgid": os.getpgid(0),
            "sid": os.getsid(0),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        }


class UnforkableBridge(ForkProbeBridge):
    """Says its module must not be forked after import: pools spawn it."""

    fork_safe = False
