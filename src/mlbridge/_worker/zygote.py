"""``python -m mlbridge._worker.zygote <bridge>``: a warm template that forks workers.

Used by the ``start = "fork"`` bridge option.

The host (:mod:`mlbridge._backends.fork`) starts one template per bridge configuration. The
template caps thread pools, imports the bridge's module — the framework import a spawned worker
pays every time — and checks that forking is still safe: one thread only (counted by Python and
in ``/proc/self/task``), CUDA not initialised, and the bridge class not saying
``fork_safe = False``. It then answers ``{"ready": ...}`` or ``{"refuse": why}`` on its control
socket (a ``SOCK_SEQPACKET`` end inherited as ``--control-fd``) and waits.

Each ``{"op": "fork", ...}`` request carries the worker's stdin, stdout and stderr pipe ends as
SCM_RIGHTS file descriptors. The child puts them on fds 0/1/2, starts its own session (process
group), sets its parent-death signal (the template's own is tied to the host, so a host killed
by SIGKILL takes the template and with it every worker), tells the template it is set up, and
runs the ordinary worker entry (:func:`mlbridge._worker.entry.main`: stdout protection, limits,
the bridge's ``setup``/``_initialize_framework``, serving) with the class already imported. The
template answers ``{"pid": N}``; when a child exits it reaps it and reports
``{"exit": N, "code": C}`` (``C`` as ``Popen.returncode``). When the host closes the socket the
template kills what is left of its workers and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import signal
import socket
import sys
import threading
import traceback
from typing import Any

from .._protocol.exit_codes import EXIT_INTERNAL
from . import entry
from .limits import die_with_parent, set_threads

__all__ = ["main", "unsafe_reason"]


def unsafe_reason(cls: type[Any]) -> str | None:
    """Why forking workers from this process is unsafe now, or None when it is safe."""
    if getattr(cls, "fork_safe", True) is False:
        return f"the bridge class {cls.__name__} sets fork_safe = False"
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = 1
    threads = max(threading.active_count(), tasks)
    if threads > 1:
        return (
            f"{threads} threads run after importing the bridge (a forked child would hold "
            "copies of their locks with no thread to release them)"
        )
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                return "CUDA was initialised while importing the bridge (never fork after that)"
    return None


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        sock.send(json.dumps(msg).encode())


def _child(
    sock: socket.socket, wake: tuple[int, int], fds: list[int], sync_w: int, argv: list[str]
) -> None:
    code = EXIT_INTERNAL
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in wake:
            os.close(fd)
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        die_with_parent(os.getppid())
        random.seed()  # the template's random state is not shared between workers
        os.write(sync_w, b"1")
        os.close(sync_w)
        code = entry.main(argv)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    with contextlib.suppress(BaseException):
        sys.stderr.flush()
    os._exit(code)


def _fork(
    sock: socket.socket, wake: tuple[int, int], bridge: str, req: dict[str, Any], fds: list[int]
) -> dict[str, Any]:
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return {"error": f"a fork request needs 3 file descriptors, got {len(fds)}"}
    argv = [bridge, "--mode", str(req["mode"]), "--worker-id", str(req["worker_id"])]
    argv += [
        "--max-frame-bytes",
        str(int(req["max_frame_bytes"])),
        "--parent-pid",
        str(os.getpid()),
    ]
    if req.get("limits"):
        argv += ["--limits-json", json.dumps(req["limits"])]
    sync_r, sync_w = os.pipe()
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
        sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in (*fds, sync_r, sync_w):
            os.close(fd)
        return {"error": f"fork failed: {exc}"}
    if pid == 0:
        os.close(sync_r)
        _child(sock, wake, fds, sync_w, argv)
    os.close(sync_w)
    for fd in fds:
        os.close(fd)
    # the child is in its own session with its parent-death signal set before the host hears of it
    with contextlib.suppress(OSError):
        if select.select([sync_r], [], [], 30)[0]:
            os.read(sync_r, 1)
    os.close(sync_r)
    return {"pid": pid}


def _reap(sock: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _serve(sock: socket.socket, bridge: str) -> int:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    children: set[int] = set()
    while True:
        ready = select.select([sock.fileno(), wake_r], [], [])[0]
        if wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(wake_r, 4096)
            _reap(sock, children)
        if sock.fileno() not in ready:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 3)
        except OSError:
            data, fds = b"", []
        if not data:
            break  # the host closed the template (its pool closed) or is gone
        try:
            req = json.loads(data)
            reply = _fork(sock, (wake_r, wake_w), bridge, req, fds)
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"error": f"bad request: {exc}"}
        if "pid" in reply:
            children.add(int(reply["pid"]))
        _send(sock, reply)
    for pid in children:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlbridge._worker.zygote")
    p.add_argument("bridge")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    sock = socket.socket(fileno=args.control_fd)
    die_with_parent(args.parent_pid)
    if args.threads:
        set_threads(args.threads)
    # numpy's OpenBLAS starts its thread pool at import unless capped; forked workers share
    # the cap (torch's own intra-op threads start later, in each worker)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        cls = entry.load_bridge_class(args.bridge)
        preload = getattr(cls, "preload_framework", None)
        if preload is not None:
            preload(json.loads(os.environ.get("MLBRIDGE_WORKER_SETTINGS") or "{}"))
    except BaseException as exc:
        why = f"the template cannot import the bridge: {type(exc).__name__}: {exc}"
        _send(sock, {"refuse": why})
        return 1
    reason = unsafe_reason(cls)
    if reason is not None:
        _send(sock, {"refuse": reason})
        return 0
    entry.PRELOADED[args.bridge] = cls
    _send(sock, {"ready": True, "pid": os.getpid()})
    return _serve(sock, args.bridge)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)
