"""The worker's side of its limits and isolation (the plan of :mod:`mlbridge._backends.isolation`).

:func:`apply` runs before the bridge is imported, in this order: join the cgroups the host made
(their limits then hold for this process and everything it starts), unshare the network
namespace and bring its loopback up, unshare the mount namespace and remount every mount
read-only except the private working directory, set rlimits (soft and hard), pin CPUs, change to
the private directory. :func:`drop_privileges` (after the bridge's setup) then trades root for
``nobody``, so a sandboxed worker cannot undo any of the above. A step that fails raises
:class:`OSError`: the worker then reports a boot error rather than running with less isolation
than asked for.

:func:`limit_error` turns an exception a call raised because of a limit (``MemoryError`` under
``max_memory``, ``EAGAIN`` from fork under ``max_processes``, ``EMFILE`` under
``max_open_files``) into a :class:`~mlbridge.errors.ResourceLimitError` naming the limit, its
value and the fix; the worker then stops itself (:data:`EXIT_RESOURCE_LIMIT`) to be replaced.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import socket
import struct
import traceback
from typing import Any

from .._units import format_size
from ..errors import ResourceLimitError

__all__ = ["ISOLATION_ENV", "active", "apply", "drop_privileges", "limit_error", "report"]

ISOLATION_ENV = "MLBRIDGE_WORKER_ISOLATION"
_CLONE_NEWNET = 0x40000000
_CLONE_NEWNS = 0x00020000
_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_FLAG_OF = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC}

_plan: dict[str, Any] = {}
_notes: dict[str, str] = {}


def active() -> dict[str, Any]:
    """The limits in force in this worker (``{}`` when none were asked for)."""
    limits: dict[str, Any] = _plan.get("limits", {})
    return limits


def report() -> dict[str, Any] | None:
    """For ``get_info``: the host's plan report plus what this worker could not apply."""
    if not _plan:
        return None
    rep: dict[str, Any] = json.loads(json.dumps(_plan.get("report", {})))
    rep.setdefault("not_applied", {}).update(_notes)
    return rep


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def apply(raw: str | None = None) -> None:
    """Apply the plan in ``raw`` (default: the ``MLBRIDGE_WORKER_ISOLATION`` variable)."""
    raw = os.environ.pop(ISOLATION_ENV, None) if raw is None else raw
    if not raw:
        return
    plan = json.loads(raw)
    _plan.clear()
    _plan.update(plan)
    for procs in plan.get("cgroups", []):
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    libc = _libc()
    if plan.get("network") is False:
        _check(libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        _loopback_up()
    workdir = plan.get("workdir")
    if plan.get("read_only"):
        _read_only(libc, workdir)
    for name, value in plan.get("rlimits", {}).items():
        which = getattr(resource, name)
        resource.setrlimit(which, (int(value), int(value)))
    if plan.get("affinity"):
        os.sched_setaffinity(0, plan["affinity"])
    if workdir:
        os.chdir(workdir)
    _baseline["pids_events"] = _pids_events() or 0


def drop_privileges() -> None:
    """Become ``nobody`` when the plan says so: after the bridge's setup, since the host's
    interpreter and packages may live where ``nobody`` cannot read (such as under /root)."""
    drop = _plan.get("drop_to")
    if drop:
        os.setgroups([])
        os.setgid(int(drop[1]))
        os.setuid(int(drop[0]))


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14s", b"lo", 0, b"")
        flags = struct.unpack("16sh14s", fcntl.ioctl(s.fileno(), siocgifflags, req))[1]
        fcntl.ioctl(s.fileno(), siocsifflags, struct.pack("16sh14s", b"lo", flags | iff_up, b""))


def _read_only(libc: Any, workdir: str | None) -> None:
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    if workdir:
        w = workdir.encode()
        _check(libc.mount(w, w, None, _MS_BIND, None), f"bind {workdir}")
    failed = []
    for point, opts in _mount_points():
        if workdir and point == workdir:
            continue
        flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY
        for opt in opts.split(","):
            flags |= _FLAG_OF.get(opt, 0)
        if libc.mount(None, point.encode(), None, flags, None) != 0:
            failed.append(point)
    if failed:
        _notes["read_only"] = "still writable: " + ", ".join(failed[:8])


def _mount_points() -> list[tuple[str, str]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split(" - ")[0].split()
            if len(parts) >= 6:
                point = parts[4].replace("\\040", " ")
                out.append((point, parts[5]))
    return out


def _pids_events() -> int | None:
    """How often this worker's pids cgroup refused a fork (``max`` in pids.events), if known."""
    for procs in _plan.get("cgroups", []):
        folder = os.path.dirname(procs)
        try:
            with open(os.path.join(folder, "pids.events")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "max":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _process_limit_hit(exc: BaseException) -> bool:
    """A fork or thread start refused (EAGAIN), and — where the pids cgroup tells — refused by
    the limit (a non-blocking socket's EAGAIN is not a process limit)."""
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):
        refused = True
    elif isinstance(exc, OSError) and exc.errno == errno.EAGAIN:
        tb = "".join(traceback.format_exception(exc))
        refused = any(w in tb for w in ("fork", "_execute_child", "spawn", "Thread", "Pool"))
    else:
        return False
    count = _pids_events()
    if count is not None:
        return count > _baseline.get("pids_events", 0)
    return refused


_baseline: dict[str, int] = {}


def limit_error(exc: BaseException) -> ResourceLimitError | None:
    """The limit ``exc`` most likely comes from, as an error naming it; None when not one."""
    limits = active()
    if not limits or isinstance(exc, ResourceLimitError):
        return None
    limit: str | None = None
    if isinstance(exc, MemoryError) and "max_memory" in limits:
        limit = "max_memory"
    elif isinstance(exc, OSError) and exc.errno == errno.EMFILE and "max_open_files" in limits:
        limit = "max_open_files"
    elif "max_processes" in limits and _process_limit_hit(exc):
        limit = "max_processes"
    if limit is None:
        return None
    value = limits[limit]
    shown = format_size(int(value)) if limit == "max_memory" else str(value)
    fix = (
        f"raise the bridge option {limit} (now {shown}) if the work needs more, "
        "or make the code use less"
    )
    what = {
        "max_memory": "ran out of memory",
        "max_open_files": "ran out of file descriptors",
        "max_processes": "could not start another process or thread",
    }[limit]
    err = ResourceLimitError(
        f"the call {what}: it hit the bridge's {limit} limit ({limit}={shown}; "
        f"{type(exc).__name__}: {exc}); the worker is replaced. Fix: {fix}",
        limit=limit,
        value=shown,
        fix=fix,
    )
    return err
