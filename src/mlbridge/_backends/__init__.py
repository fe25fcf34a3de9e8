"""Backends: where and how worker processes run.

A backend turns a worker command line into a running process and hands the host a
:class:`WorkerHandle`: three non-blocking pipe fds (the worker's stdin, stdout, stderr), an fd
that becomes readable when the process exits (or -1 to be polled), and ways to signal and reap
it. The host's channel speaks the wire protocol over those fds and never learns how the process
was started, so a backend that forks from a warm zygote, or one that runs the worker inside a Ray
actor and relays its pipes, plugs in without touching the host.

Backends are chosen per bridge (option ``backend``) and imported on demand. Only ``local`` (a
subprocess of the host) exists today.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = ["BACKENDS", "Backend", "WorkerHandle", "get_backend"]

BACKENDS: Mapping[str, str] = {"local": "mlbridge._backends.local:LocalBackend"}


class WorkerHandle(Protocol):
    pid: int
    stdin_fd: int
    stdout_fd: int
    stderr_fd: int
    exit_fd: int  # readable once the process has exited; -1 means "poll me"

    def poll(self) -> int | None:
        """The exit status once the process has exited (reaping it), else None."""
        ...

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker and everything it started (its process group)."""
        ...

    def close_stdin(self) -> None: ...

    def release(self) -> None:
        """Close every fd the handle still holds (after the process exited)."""
        ...


class Backend(Protocol):
    name: str

    def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> WorkerHandle: ...


_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    backend = _instances.get(name)
    if backend is None:
        target = BACKENDS.get(name)
        if target is None:
            raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
        module, _, cls = target.partition(":")
        backend = _instances[name] = getattr(importlib.import_module(module), cls)()
    return backend
