"""The ``fork`` backend: workers forked from a warm template (the ``start = "fork"`` option).

Theory of operation
-------------------
Per host loop and bridge configuration (bridge, interpreter, target, settings, environment,
thread cap) one *template* is started once: ``python -m mlbridge._worker.zygote`` (see that
module), which imports the bridge's module — the framework import every spawned worker pays —
while it is still single-threaded, checks that forking is safe and answers ``ready`` or
``refuse`` on a ``SOCK_SEQPACKET`` control socket. For each worker the host makes three pipes and
passes the worker's ends to the template with SCM_RIGHTS; the template forks, the child sets up
its session, parent-death signal, stdout protection and limits and runs the ordinary worker
entry (the bridge's own ``setup`` runs in the child, after the fork), and the template answers
the child's pid.

The host side of a worker is the local backend's :class:`~.local.PipeTransport` unchanged: it
gets a process-like object (:class:`ForkedProcess`) whose pipes are the host's ends and whose
``poll`` asks the template for the exit status (the worker is the template's child, so the host
cannot wait for it; its exit is noticed with a pidfd, which works for any process, and the
template reaps the child and reports ``{"exit": pid, "code": ...}``). The worker leads its own
process group and carries the host's token in its environment (inherited from the template), so
signals and the reaper's identity checks work as for spawned workers. Parent-death: the template
dies with the host (PR_SET_PDEATHSIG), and every worker dies with the template.

Fallback to spawn (the local backend), with one log line naming why: the spec asks for OS
isolation (cgroups, namespaces: the spawn path applies those), the template refuses (threads
after the import, CUDA initialised, the bridge class sets ``fork_safe = False``), or the template
cannot start or stops answering. Templates are stopped when their pool closes
(:func:`close_templates`) and at interpreter exit.

Known cost: the template's start (one framework import) blocks the host's loop thread, once per
pool; every later worker start costs a fork.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import threading
import time
from typing import Any

from . import TransportEvents, WorkerSpec, worker_command
from .local import LocalBackend, PipeTransport

__all__ = ["ForkBackend", "ForkedProcess", "close_templates", "live_templates"]

log = logging.getLogger("mlbridge.fork")

#: How long a template may take to import the bridge and answer.
TEMPLATE_TIMEOUT = 120.0
#: How long one fork request may take.
FORK_TIMEOUT = 30.0


class _Template:
    """One warm template process and its control socket (loop thread only, but ``close``)."""

    def __init__(self, spec: WorkerSpec, key: str, loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.bridge = spec.bridge
        self.loop = loop
        self.exits: dict[int, int] = {}
        self.dead = False
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        argv = [spec.python, "-m", "mlbridge._worker.zygote", spec.target]
        argv += ["--control-fd", str(theirs.fileno())]
        if spec.parent_pid is not None:
            argv += ["--parent-pid", str(spec.parent_pid)]
        if spec.threads:
            argv += ["--threads", str(spec.threads)]
        _cmd, env = worker_command(spec)
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.pid = self.proc.pid

    # ---------------------------------------------------------------- control socket
    def _read(self, timeout: float) -> dict[str, Any] | None:
        """The next reply (exit reports are filed on the way); None on timeout or EOF."""
        deadline = time.monotonic() + timeout
        while not self.dead:
            left = deadline - time.monotonic()
            if left < 0 or not select.select([self.sock], [], [], left)[0]:
                return None
            msg = self._recv_one()
            if msg is not None and "exit" not in msg:
                return msg
        return None

    def _recv_one(self) -> dict[str, Any] | None:
        try:
            data = self.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self.dead = True
            return None
        msg: dict[str, Any] = json.loads(data)
        if "exit" in msg:
            self.exits[int(msg["exit"])] = int(msg["code"])
        return msg

    def drain(self) -> None:
        with self._lock:
            while not self.dead and select.select([self.sock], [], [], 0)[0]:
                self._recv_one()

    def ready(self) -> str | None:
        """Wait for the template's answer: None when it is ready, else why not."""
        with self._lock:
            msg = self._read(TEMPLATE_TIMEOUT)
        if msg is not None and msg.get("ready"):
            return None
        if msg is not None and "refuse" in msg:
            return str(msg["refuse"])
        code = self.proc.poll()
        if code is None:
            return f"the template gave no answer within {TEMPLATE_TIMEOUT:g} s"
        return f"the template exited with code {code} before it was ready"

    def fork(self, spec: WorkerSpec) -> ForkedProcess:
        req = {
            "op": "fork",
            "worker_id": spec.worker_id,
            "mode": spec.mode,
            "max_frame_bytes": spec.max_frame_bytes,
            "limits": dict(spec.limits),
        }
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            with self._lock:
                if self.dead:
                    raise OSError("the fork template is gone")
                socket.send_fds(self.sock, [json.dumps(req).encode()], [in_r, out_w, err_w])
                reply = self._read(FORK_TIMEOUT)
        except BaseException:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (in_r, out_w, err_w):
                os.close(fd)
        if reply is None or "pid" not in reply:
            for fd in (in_w, out_r, err_r):
                os.close(fd)
            why = "no answer" if reply is None else reply.get("error", reply)
            raise OSError(f"the fork template did not start a worker: {why}")
        return ForkedProcess(int(reply["pid"]), in_w, out_r, err_r, self)

    def exit_code(self, pid: int) -> int | None:
        self.drain()
        code = self.exits.pop(pid, None)
        if code is not None or not self.dead:
            return code
        try:  # the template is gone (its workers die with it): is this one gone too?
            os.kill(pid, 0)
        except ProcessLookupError:
            return -9
        except PermissionError:
            return None
        return None

    def close(self, timeout: float = 5.0) -> None:
        """End the template: it kills workers still running and exits."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        self.dead = True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()


class ForkedProcess:
    """What :class:`PipeTransport` needs of a ``Popen``, for a worker the template forked."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int, template: _Template):
        self.pid = pid
        self.stdin = os.fdopen(stdin, "wb", buffering=0)
        self.stdout = os.fdopen(stdout, "rb", buffering=0)
        self.stderr = os.fdopen(stderr, "rb", buffering=0)
        self.returncode: int | None = None
        self._template = template

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._template.exit_code(self.pid)
        return self.returncode


_templates: dict[str, _Template] = {}
_refused: dict[str, str] = {}
_guard = threading.Lock()


def _key(spec: WorkerSpec, loop: asyncio.AbstractEventLoop) -> str:
    parts = [id(loop), spec.bridge, spec.python, spec.target, dict(spec.settings)]
    parts += [sorted(spec.env.items()), spec.threads, spec.parent_pid]
    return json.dumps(parts, sort_keys=True, default=str)


def _fall_back(spec: WorkerSpec, why: str) -> None:
    log.warning('bridge %r: start = "fork" falls back to spawn: %s', spec.bridge, why)


class ForkBackend:
    name = "fork"

    def start(
        self, spec: WorkerSpec, events: TransportEvents, loop: asyncio.AbstractEventLoop
    ) -> PipeTransport:
        if spec.isolation:
            key = "isolation:" + _key(spec, loop)
            if key not in _refused:
                _refused[key] = "isolation"
                _fall_back(
                    spec,
                    "the bridge asks for OS limits or isolation (cgroups, namespaces), which "
                    "only a spawned worker applies",
                )
            return LocalBackend().start(spec, events, loop)
        template = self._template(spec, loop)
        if template is not None:
            try:
                proc = template.fork(spec)
            except OSError as exc:
                _fall_back(spec, str(exc))
                self._drop(template)
            else:
                return PipeTransport(proc, events, loop)  # type: ignore[arg-type]
        return LocalBackend().start(spec, events, loop)

    def _template(self, spec: WorkerSpec, loop: asyncio.AbstractEventLoop) -> _Template | None:
        key = _key(spec, loop)
        if key in _refused:
            return None
        with _guard:
            template = _templates.get(key)
        if template is not None and not template.dead:
            return template
        if template is not None:
            self._drop(template)
        try:
            template = _Template(spec, key, loop)
        except OSError as exc:
            why = f"cannot start the template with {spec.python!r}: {exc}"
        else:
            why_not = template.ready()
            if why_not is None:
                with _guard:
                    _templates[key] = template
                return template
            template.close()
            why = why_not
        _refused[key] = why
        _fall_back(spec, why)
        return None

    @staticmethod
    def _drop(template: _Template) -> None:
        with _guard:
            if _templates.get(template.key) is template:
                del _templates[template.key]
        template.close()


def live_templates(bridge: str | None = None) -> list[int]:
    """Pids of the running templates (of ``bridge``; all when None)."""
    with _guard:
        return [t.pid for t in _templates.values() if bridge is None or t.bridge == bridge]


def close_templates(
    bridge: str | None = None, loop: asyncio.AbstractEventLoop | None = None
) -> None:
    """Stop the templates of ``bridge`` on ``loop`` (None: any), and forget refusals for them."""
    with _guard:
        chosen = [
            t
            for t in _templates.values()
            if (bridge is None or t.bridge == bridge) and (loop is None or t.loop is loop)
        ]
        for t in chosen:
            del _templates[t.key]
    for t in chosen:
        t.close()
    if bridge is None and loop is None:
        _refused.clear()
    else:
        for key in [k for k in _refused if _matches(k, bridge, loop)]:
            del _refused[key]


def _matches(key: str, bridge: str | None, loop: asyncio.AbstractEventLoop | None) -> bool:
    with contextlib.suppress(ValueError, IndexError):
        parts = json.loads(key.removeprefix("isolation:"))
        return (bridge is None or parts[1] == bridge) and (loop is None or parts[0] == id(loop))
    return False


atexit.register(close_templates)
