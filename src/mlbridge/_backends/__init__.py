"""Backends: where and how worker processes run — the seam between the host and a worker.

The host describes a worker with a :class:`WorkerSpec` (which bridge, its settings, interpreter,
environment, limits, codec, frame limit) and a backend turns it into a running worker reachable
through a :class:`WorkerTransport`: a byte stream carrying the length-prefixed frames both ways,
plus ways to signal the worker and to learn how it ended. The backend reports what happens
through the :class:`TransportEvents` the host passes in (bytes received, stderr, exit). The host
never sees a file descriptor, an argv or a process object, so a backend may run the worker as a
local subprocess over pipes (``local``), over a socket pair (``socketpair``, an in-tree second
implementation that proves the seam), forked from a warm template, or inside a Ray actor.

Contract (checked by ``tests/test_backend_contract.py`` against every backend):

* ``Backend.start(spec, events, loop)`` returns at once with a transport; the worker is not yet
  ready (the host's ``hello`` round trip decides that).
* Every callback of ``events`` runs on ``loop``'s thread, except ``data_received`` during
  :meth:`WorkerTransport.read_now`, which runs on the thread calling it.
* ``write`` is thread-safe, never blocks (it buffers what the stream will not take yet) and
  raises :class:`BrokenPipeError` once the worker's input is gone.
* ``hold_output()`` (optional: a transport may answer False) lets a caller thread that is about
  to wait for a reply read the worker's output itself with ``read_wait`` while the loop does not
  read it, until ``release_output()``; the loop thread is then not woken by that reply at all.
* ``read_view()`` (optional: a transport may always answer -1) hands a direct call the bytes read
  now instead of passing them to ``data_received``; until ``end_view()`` nothing else is read,
  and the caller passes on to ``data_received`` whatever it does not consume itself.
* ``process_exited(returncode, consumed)`` is called exactly once, after every byte the worker
  wrote has been passed to ``data_received`` (or handed out by ``read_view``); ``consumed`` is
  how many of the bytes written so far the worker read (None when the backend cannot tell),
  which lets the host retry calls that never reached a worker that died.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

__all__ = [
    "BACKENDS",
    "Backend",
    "TransportEvents",
    "WorkerSpec",
    "WorkerTransport",
    "get_backend",
    "worker_command",
]

BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "local": "mlbridge._backends.local:LocalBackend",
        "socketpair": "mlbridge._backends.socketpair:SocketpairBackend",
        "ray": "mlbridge._backends.ray:RayBackend",
        "fork": "mlbridge._backends.fork:ForkBackend",
    }
)

#: The worker reads its framework settings from here (never from argv: ``ps`` shows argv).
SETTINGS_ENV = "MLBRIDGE_WORKER_SETTINGS"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a backend needs to start one worker."""

    bridge: str
    worker_id: str
    target: str  # what the worker runtime loads: built-in name, ``module:Class`` or a .py path
    python: str  # interpreter path or command
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    limits: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    threads: int | None = None
    codec: str = "msgpack"
    max_frame_bytes: int = 64 * 1024 * 1024
    parent_pid: int | None = None
    mode: str = "pool-worker"
    # backend-specific placement (the ray backend: num_cpus, num_gpus, resources, runtime_env)
    backend_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: OS-enforced limits and isolation asked for (see :mod:`.isolation`; empty: none)
    isolation: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __repr__(self) -> str:  # settings and env may hold secrets
        return f"WorkerSpec(bridge={self.bridge!r}, worker_id={self.worker_id!r})"


def worker_command(spec: WorkerSpec) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``spec`` with ``python -m mlbridge.worker``.

    Settings travel in the environment (readable only by the worker's owner), never in argv.
    """
    argv = [
        spec.python,
        "-m",
        "mlbridge.worker",
        spec.target,
        "--mode",
        spec.mode,
        "--worker-id",
        spec.worker_id,
        "--max-frame-bytes",
        str(spec.max_frame_bytes),
    ]
    if spec.parent_pid is not None:
        argv += ["--parent-pid", str(spec.parent_pid)]
    if spec.limits:
        argv += ["--limits-json", json.dumps(dict(spec.limits))]
    if spec.threads:
        argv += ["--threads", str(spec.threads)]
    env = dict(spec.env)
    env.pop(SETTINGS_ENV, None)
    if spec.settings:
        env[SETTINGS_ENV] = json.dumps(dict(spec.settings))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return argv, env


class TransportEvents(Protocol):
    """What a backend tells the host about one worker (implemented by the host's channel)."""

    def data_received(self, data: memoryview) -> None:
        """Bytes from the worker's frame stream (any split; the host reassembles frames)."""
        ...

    def stderr_received(self, data: bytes) -> None:
        """Bytes the worker wrote to its stderr (diagnostics, boot-error marker)."""
        ...

    def process_exited(self, returncode: int | None, consumed: int | None) -> None:
        """The worker is gone (``returncode`` as ``Popen.returncode``: -N for signal N)."""
        ...


class WorkerTransport(Protocol):
    pid: int | None  # for display, the reaper and tests; None where there is no local process

    @property
    def written(self) -> int:
        """Bytes handed to :meth:`write` so far (the offsets ``consumed`` is compared with)."""
        ...

    def write(self, header: bytes, payload: bytes | memoryview) -> None: ...

    def close_input(self) -> None:
        """End the worker's input once buffered bytes are written (a worker then exits 0)."""
        ...

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker and everything it started."""
        ...

    def read_now(self) -> int:
        """Read what the worker has sent, now, without blocking (for reply polling): bytes read,
        0 at end of stream, -1 when nothing was there or another thread is reading."""
        ...

    def read_view(self) -> memoryview | int:
        """A direct call's read (the loop's, or a caller thread's holding the output): read
        what the worker has sent, now, without blocking, and return it *without* handing it
        to ``data_received``: a view of the transport's read buffer, which the caller consumes
        or passes to ``data_received`` itself, then calls :meth:`end_view` (until then no
        other read happens, the exit's drain included). 0 at end of stream, -1 when nothing
        was read (nothing there yet, another thread reading, or a transport that delivers
        output only through its events: the call then waits for them)."""
        ...

    def end_view(self) -> None:
        """The view :meth:`read_view` returned is consumed: reads may go on."""
        ...

    def hold_output(self) -> bool:
        """Caller thread: stop the loop from reading (or waking for) the worker's output until
        :meth:`release_output`; the caller reads it with :meth:`read_wait`. False when this
        transport cannot (the loop goes on reading; the caller waits for it instead)."""
        ...

    def release_output(self, park: bool = False) -> None:
        """End :meth:`hold_output`; output left unread is the loop's again at once. With
        ``park`` (the host knows nothing else awaits output), the loop goes on not watching it
        until :meth:`watch_output`, so the next :meth:`hold_output` is free."""
        ...

    def watch_output(self) -> None:
        """Loop thread, before it writes a request whose reply it will read: undo a parked
        :meth:`release_output` (nothing to do otherwise, or while a caller holds the output)."""
        ...

    def read_wait(self, timeout: float) -> int:
        """Output held: wait up to ``timeout`` seconds for output and read it (``data_received``
        runs on this thread): bytes read, 0 at end of stream, -1 when nothing came."""
        ...


class Backend(Protocol):
    name: str

    def start(
        self, spec: WorkerSpec, events: TransportEvents, loop: asyncio.AbstractEventLoop
    ) -> WorkerTransport: ...


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
