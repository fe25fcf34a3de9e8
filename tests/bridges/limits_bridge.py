"""A bridge that misbehaves on request, for the OS-enforced limit tests (test_limits.py)."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from mlbridge.bridges.base import BaseBridge


class LimitsBridge(BaseBridge):
    name = "limits"

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "limits", "version": "1"}

    def _register_handlers(self) -> None:
        r = self.register_handler
        r("pid", lambda a: os.getpid())
        r("mem_bomb", self._mem_bomb)
        r("allocate", self._allocate)
        r("fork_bomb", self._fork_bomb)
        r("busy", self._busy)
        r("fd_flood", self._fd_flood)
        r("sleep", lambda a: time.sleep(float(a.get("seconds", 1))) or "slept")
        r("connect", self._connect)
        r("env", lambda a: dict(os.environ))
        r("cwd", lambda a: os.getcwd())
        r("write", self._write)
        r("ids", lambda a: [os.getuid(), os.geteuid()])
        r("eagain", self._eagain)

    def _mem_bomb(self, args: dict[str, Any]) -> int:
        chunks = []
        while True:  # 10 MB at a time, touched so it is resident, until something stops it
            chunks.append(bytearray(10_000_000))
            if len(chunks) > int(args.get("max_chunks", 1000)):
                return len(chunks)

    def _allocate(self, args: dict[str, Any]) -> int:
        block = bytearray(int(args["mb"]) * 1_000_000)
        return len(block)

    def _fork_bomb(self, args: dict[str, Any]) -> int:
        children = []
        try:
            while len(children) < int(args.get("max", 10_000)):
                pid = os.fork()
                if pid == 0:  # a child never returns into the worker: it sleeps, then exits
                    try:
                        time.sleep(60)
                    finally:
                        os._exit(0)
                children.append(pid)
        finally:
            if args.get("reap"):
                for pid in children:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
        return len(children)

    def _busy(self, args: dict[str, Any]) -> dict[str, float]:
        wall0, cpu0 = time.monotonic(), time.process_time()
        end = wall0 + float(args.get("seconds", 3))
        x = 0
        while time.monotonic() < end:
            x += 1
        return {"wall": time.monotonic() - wall0, "cpu": time.process_time() - cpu0}

    def _fd_flood(self, args: dict[str, Any]) -> int:
        files = []
        while len(files) < int(args.get("max", 100_000)):
            files.append(open(os.devnull))
        return len(files)

    def _connect(self, args: dict[str, Any]) -> str:
        with socket.create_connection(("127.0.0.1", int(args["port"])), timeout=5) as s:
            return s.recv(16).decode()

    def _write(self, args: dict[str, Any]) -> str:
        with open(args["path"], "w") as f:
            f.write("x")
        return "written"

    def _eagain(self, args: dict[str, Any]) -> str:
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            a.recv(1)  # nothing there: BlockingIOError (EAGAIN), not a process limit
        return "unreachable"
