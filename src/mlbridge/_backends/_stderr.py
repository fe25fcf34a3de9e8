"""A worker's stderr pipe, drained continuously (a worker must never block on a full pipe)."""

from __future__ import annotations

import asyncio
import contextlib
import os

from . import TransportEvents

__all__ = ["StderrPipe"]


class StderrPipe:
    """Watches a non-blocking stderr fd on the loop and passes what it reads to ``events``."""

    def __init__(self, fd: int, events: TransportEvents, loop: asyncio.AbstractEventLoop) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._events = events
        self._loop = loop
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._loop.remove_reader(self.fd)
            return
        self._events.stderr_received(data)

    def finish(self) -> None:
        """The worker exited: pass on what it left in the pipe, stop watching."""
        rest = bytearray()
        with contextlib.suppress(OSError):
            while data := os.read(self.fd, 65536):
                rest += data
        self._loop.remove_reader(self.fd)
        if rest:
            self._events.stderr_received(bytes(rest))
