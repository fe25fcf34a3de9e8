"""OS-enforced limits and isolation for one worker: what this machine allows, and applying it.

Theory of operation
-------------------
:func:`probe` finds out once per host process what the kernel lets this host do: create child
cgroups (cgroup v2 with the ``memory``/``cpu``/``pids`` controllers delegated, else the cgroup
v1 hierarchies of those controllers), unshare a network namespace, unshare a mount namespace.
``MLBRIDGE_ISOLATION_DISABLE`` (comma-separated: ``cgroup``, ``netns``, ``mountns``) makes the
probe pretend a mechanism is missing, so the fallbacks can be exercised on a machine that has it.

:func:`request_of` turns a bridge's options into the plain request a :class:`WorkerSpec` carries
(the sandbox bridge's defaults filled in). A backend calls :func:`prepare` just before starting
the worker: it creates the worker's cgroups and writes their limits, makes the private working
directory, filters the environment, and returns a :class:`Plan` whose ``worker_json`` the worker
applies to itself before it imports its bridge (:mod:`mlbridge._worker.isolate`: join the
cgroups, unshare, remount read-only, rlimits, affinity, change directory). A limit that cannot be
enforced is never silently dropped: the plan lists it in ``not_applied`` with the reason, and a
``network = false`` that cannot be honoured refuses to start the worker (:class:`IsolationError`).

When the worker has exited the backend calls :meth:`Plan.finish`: it learns whether the kernel
stopped the worker for memory (the cgroup's ``oom_kill`` counter), kills whatever the worker left
in its cgroups or process group, removes the cgroups and the private directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._builtin_bridges import BUILTIN_BRIDGES
from .._units import format_size

__all__ = [
    "ISOLATION_ENV",
    "Capabilities",
    "IsolationError",
    "Plan",
    "describe_machine",
    "prepare",
    "probe",
    "request_of",
    "summarize",
    "sweep_stale",
    "sweep_stale_dirs",
]

#: The worker reads its isolation plan (JSON) from this variable.
ISOLATION_ENV = "MLBRIDGE_WORKER_ISOLATION"
DISABLE_ENV = "MLBRIDGE_ISOLATION_DISABLE"

#: Defaults of the ``sandbox`` bridge (explicit options win).
SANDBOX_DEFAULTS: Mapping[str, Any] = {
    "max_memory": 512 * 1024 * 1024,
    "max_cpu": 100.0,
    "max_processes": 32,
    "max_open_files": 64,
    "network": False,
    "env_allowlist": (),
    "private_tmp": True,
    "read_only": True,
}
#: Always passed through an ``env_allowlist`` (the interpreter needs them; they hold no secrets).
BASE_ENV = ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
_KEEP_ENV = ("MLBRIDGE_HOST_TOKEN",)  # the reaper's token (see mlbridge._host.reaper)
_CONTROLLERS = ("memory", "cpu", "pids")
_CG_PREFIX = "mlbridge-"
_SANDBOX_TARGETS = frozenset(
    {"sandbox", BUILTIN_BRIDGES["sandbox"], BUILTIN_BRIDGES["sandbox"].partition(":")[0]}
)


class IsolationError(OSError):
    """An isolation option this machine cannot honour (the worker is not started)."""


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What this host may do. ``cgroup_dirs``: controller -> folder it may create cgroups in."""

    cgroup_version: int | None
    cgroup_dirs: Mapping[str, str]
    netns: bool
    mountns: bool
    why_not: Mapping[str, str] = field(default_factory=dict)


def _disabled() -> set[str]:
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) of every mount, from /proc/self/mountinfo."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts, rparts = left.split(), right.split()
                if len(parts) >= 5 and len(rparts) >= 3:
                    out.append((_unescape(parts[4]), rparts[0], rparts[2]))
    except OSError:
        pass
    return out


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")


def _own_cgroups() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _hid, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in ctrls.split(",") if ctrls else [""]:
                    out[c] = path
    except OSError:
        pass
    return out


def _can_create(parent: str) -> str | None:
    """None when a child cgroup can be made under ``parent``, else why not."""
    test = os.path.join(parent, f"{_CG_PREFIX}probe-{os.getpid()}")
    try:
        os.mkdir(test)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create a cgroup under {parent}: {exc.strerror}"
    with contextlib.suppress(OSError):
        os.rmdir(test)
    return None


def _probe_v2(mounts: list[tuple[str, str, str]], own: dict[str, str]) -> tuple[str | None, str]:
    root = next((m for m, t, _ in mounts if t == "cgroup2"), None)
    if root is None or "" not in own:
        return None, "no cgroup v2 hierarchy is mounted"
    parent = os.path.normpath(root + own[""])
    try:
        with open(os.path.join(parent, "cgroup.controllers")) as f:
            available = set(f.read().split())
    except OSError as exc:
        return None, f"cannot read {parent}/cgroup.controllers: {exc.strerror}"
    missing = [c for c in _CONTROLLERS if c not in available]
    if missing:
        return None, f"cgroup v2 at {parent} lacks the {', '.join(missing)} controller(s)"
    why = _can_create(parent)
    if why:
        return None, why
    try:
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
            enabled = set(f.read().split())
        want = [c for c in _CONTROLLERS if c not in enabled]
        if want:
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join(f"+{c}" for c in want))
    except OSError as exc:
        return None, f"cannot delegate controllers in {parent}: {exc.strerror}"
    return parent, ""


def _probe_v1(
    mounts: list[tuple[str, str, str]], own: dict[str, str]
) -> tuple[dict[str, str], str]:
    dirs: dict[str, str] = {}
    why: list[str] = []
    for c in _CONTROLLERS:
        root = next((m for m, t, opts in mounts if t == "cgroup" and c in opts.split(",")), None)
        if root is None or c not in own:
            why.append(f"no cgroup v1 {c} hierarchy")
            continue
        parent = os.path.normpath(root + own[c])
        problem = _can_create(parent)
        if problem:
            why.append(problem)
        else:
            dirs[c] = parent
    return dirs, "; ".join(why)


def _can_unshare(flag: str) -> tuple[bool, str]:
    """Whether a child process may unshare (``net`` or ``mount``): tried for real, once."""
    code = (
        "import ctypes, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"sys.exit(0 if libc.unshare({_CLONE[flag]}) == 0 else ctypes.get_errno())\n"
    )
    try:
        rc = subprocess.run(
            [sys.executable, "-S", "-c", code], timeout=30, capture_output=True, check=False
        ).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"cannot test unshare: {exc}"
    if rc == 0:
        return True, ""
    return False, f"unshare({flag}) is refused here ({os.strerror(rc) if rc > 0 else rc})"


_CLONE = {"net": 0x40000000, "mount": 0x00020000}


@functools.cache
def _probe_cached(disabled: frozenset[str]) -> Capabilities:
    why: dict[str, str] = {}
    version: int | None = None
    dirs: dict[str, str] = {}
    if not sys.platform.startswith("linux"):
        why = dict.fromkeys(("cgroup", "netns", "mountns"), "not Linux")
        return Capabilities(None, {}, False, False, why)
    if "cgroup" in disabled:
        why["cgroup"] = f"disabled by {DISABLE_ENV}"
    else:
        mounts, own = _mounts(), _own_cgroups()
        v2, why2 = _probe_v2(mounts, own)
        if v2 is not None:
            version, dirs = 2, dict.fromkeys(_CONTROLLERS, v2)
        else:
            dirs, why1 = _probe_v1(mounts, own)
            version = 1 if dirs else None
            if len(dirs) < len(_CONTROLLERS):
                why["cgroup"] = f"{why2}; {why1}" if why1 else why2
    sweep_stale(dirs)
    sweep_stale_dirs()
    netns = mountns = False
    if "netns" in disabled:
        why["netns"] = f"disabled by {DISABLE_ENV}"
    else:
        netns, w = _can_unshare("net")
        if w:
            why["netns"] = w
    if "mountns" in disabled:
        why["mountns"] = f"disabled by {DISABLE_ENV}"
    else:
        mountns, w = _can_unshare("mount")
        if w:
            why["mountns"] = w
    return Capabilities(version, dirs, netns, mountns, why)


def sweep_stale(dirs: Mapping[str, str]) -> list[str]:
    """Remove the cgroups of hosts that are gone (killed before they could clean up)."""
    removed = []
    for parent in set(dirs.values()):
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            m = _STALE_RE.fullmatch(name)
            if m is None or _alive(int(m.group(1))):
                continue
            path = os.path.join(parent, name)
            _remove_cgroup(path)
            if not os.path.exists(path):
                removed.append(path)
    return removed


def sweep_stale_dirs(folder: str | None = None) -> list[str]:
    """Remove private directories of hosts that are gone (``mlbridge-tmp-<host pid>-...``)."""
    folder = folder or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.fullmatch(name)
        path = os.path.join(folder, name)
        if m is None or _alive(int(m.group(1))) or os.path.islink(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


_TMP_PREFIX = "mlbridge-tmp-"
_TMP_RE = re.compile(rf"{_TMP_PREFIX}(\d+)-.+")
_STALE_RE = re.compile(rf"{_CG_PREFIX}(?:probe-)?(\d+)(?:-.+)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def probe() -> Capabilities:
    """What this machine lets the host enforce (cached per value of ``DISABLE_ENV``)."""
    return _probe_cached(frozenset(_disabled()))


# --------------------------------------------------------------------------- requests


def request_of(options: Any, target: str, env_keys: list[str]) -> dict[str, Any]:
    """The limits and isolation a bridge asks for, as the plain mapping a WorkerSpec carries.

    ``options``: the bridge's :class:`~mlbridge.config.BridgeOptions`; ``target``: its worker
    target (the ``sandbox`` bridge gets :data:`SANDBOX_DEFAULTS` for what it leaves unset);
    ``env_keys``: the variables the bridge's own ``env`` sets (always passed on).
    """
    sandboxed = target in _SANDBOX_TARGETS
    out: dict[str, Any] = {}
    for key in SANDBOX_DEFAULTS:
        value = getattr(options, key, None)
        if value is None and sandboxed:
            value = SANDBOX_DEFAULTS[key]
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    if not out:
        return {}
    out["timeout"] = getattr(options, "timeout", None)
    out["env_keys"] = sorted(env_keys)
    out["sandboxed"] = sandboxed
    return out


# --------------------------------------------------------------------------- plans


@dataclass(slots=True)
class Plan:
    """One worker's limits and isolation: made by :func:`prepare`, ended by :meth:`finish`."""

    request: Mapping[str, Any]
    mechanisms: dict[str, str] = field(default_factory=dict)  # limit -> how it is enforced
    not_applied: dict[str, str] = field(default_factory=dict)  # limit -> why not
    cgroups: list[str] = field(default_factory=list)
    memory_cgroup: str | None = None
    workdir: str | None = None
    worker: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    exit_cause: dict[str, Any] | None = None
    _finished: bool = False

    @property
    def worker_json(self) -> str:
        return json.dumps(self.worker)

    def report(self) -> dict[str, Any]:
        """What ``get_info`` and ``doctor`` show: the mechanism of each limit, what is missing."""
        return {
            "limits": {k: v for k, v in self.request.items() if k in SANDBOX_DEFAULTS},
            "mechanisms": dict(self.mechanisms),
            "not_applied": dict(self.not_applied),
        }

    def started(self, pid: int) -> None:
        self.pid = pid

    def finish(self, returncode: int | None) -> None:
        """After the worker's exit: why (a memory kill?), then kill leftovers and clean up."""
        if self._finished:
            return
        self._finished = True
        if self.memory_cgroup is not None and returncode == -signal.SIGKILL:
            if _oom_kills(self.memory_cgroup) > 0:
                self.exit_cause = limit_cause("max_memory", self.request.get("max_memory"))
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.pid, signal.SIGKILL)
        for cg in self.cgroups:
            _remove_cgroup(cg)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def cleanup_unstarted(self) -> None:
        self.finish(None)


def limit_cause(limit: str, value: Any) -> dict[str, Any]:
    """The ``limit``/``value``/``fix`` triple an error about ``limit`` carries."""
    shown = _show(limit, value)
    return {
        "limit": limit,
        "value": shown,
        "fix": f"raise the bridge option {limit} (now {shown}) if the work needs more, "
        "or make the code use less",
    }


def _show(limit: str, value: Any) -> str:
    if value is None:
        return "unset"
    if limit == "max_memory":
        return format_size(int(value))
    if limit == "max_cpu":
        return f"{float(value):g}%"
    if limit == "timeout":
        return f"{float(value):g}s"
    return str(value)


def _oom_kills(cg: str) -> int:
    for name in ("memory.events", "memory.oom_control"):
        try:
            with open(os.path.join(cg, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    with contextlib.suppress(OSError, ValueError), open(os.path.join(cg, "memory.failcnt")) as f:
        return int(f.read().strip() or 0)
    return 0


def _remove_cgroup(cg: str) -> None:
    deadline = time.monotonic() + 5.0
    while True:
        with contextlib.suppress(OSError), open(os.path.join(cg, "cgroup.kill"), "w") as f:
            f.write("1")
        try:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return  # already gone
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(cg)
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _make_cgroups(plan: Plan, caps: Capabilities, worker_id: str, req: Mapping[str, Any]) -> None:
    want = {
        "memory": "max_memory" in req,
        "cpu": "max_cpu" in req,
        "pids": "max_processes" in req,
    }
    made: dict[str, str] = {}
    name = f"{_CG_PREFIX}{os.getpid()}-{worker_id}"
    for ctrl, needed in want.items():
        parent = caps.cgroup_dirs.get(ctrl)
        if not needed or parent is None:
            continue
        path = made.get(parent) or os.path.join(parent, name)
        if parent not in made:
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            except OSError as exc:
                plan.not_applied[_LIMIT_OF[ctrl]] = f"cannot create {path}: {exc.strerror}"
                continue
            made[parent] = path
            plan.cgroups.append(path)
        try:
            _set_controller(plan, caps.cgroup_version or 1, ctrl, path, req)
        except OSError as exc:
            plan.not_applied[_LIMIT_OF[ctrl]] = f"cannot write {ctrl} limits in {path}: {exc}"


_LIMIT_OF = {"memory": "max_memory", "cpu": "max_cpu", "pids": "max_processes"}


def _set_controller(plan: Plan, version: int, ctrl: str, path: str, req: Mapping[str, Any]) -> None:
    v = f"cgroup v{version}"
    if ctrl == "memory":
        limit = int(req["max_memory"])
        if version == 2:
            _write(os.path.join(path, "memory.max"), str(limit))
            with contextlib.suppress(OSError):
                _write(os.path.join(path, "memory.swap.max"), "0")
            plan.mechanisms["max_memory"] = f"{v} memory.max"
        else:
            _write(os.path.join(path, "memory.limit_in_bytes"), str(limit))
            with contextlib.suppress(OSError):  # no swap either, where the kernel accounts it
                _write(os.path.join(path, "memory.memsw.limit_in_bytes"), str(limit))
            plan.mechanisms["max_memory"] = f"{v} memory.limit_in_bytes"
        plan.memory_cgroup = path
    elif ctrl == "cpu":
        period = 100_000
        quota = max(1000, int(period * float(req["max_cpu"]) / 100.0))
        if version == 2:
            _write(os.path.join(path, "cpu.max"), f"{quota} {period}")
            plan.mechanisms["max_cpu"] = f"{v} cpu.max"
        else:
            _write(os.path.join(path, "cpu.cfs_period_us"), str(period))
            _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))
            plan.mechanisms["max_cpu"] = f"{v} cpu.cfs_quota_us"
    else:
        _write(os.path.join(path, "pids.max"), str(int(req["max_processes"])))
        plan.mechanisms["max_processes"] = f"{v} pids.max"
    plan.worker.setdefault("cgroups", []).append(os.path.join(path, "cgroup.procs"))


def _fallbacks(plan: Plan, req: Mapping[str, Any]) -> None:
    rl: dict[str, int] = plan.worker.setdefault("rlimits", {})
    if "max_memory" in req and "max_memory" not in plan.mechanisms:
        rl["RLIMIT_AS"] = int(req["max_memory"])
        rl["RLIMIT_DATA"] = int(req["max_memory"])
        plan.mechanisms["max_memory"] = (
            "RLIMIT_AS + RLIMIT_DATA (virtual memory: the call gets a MemoryError; "
            "no memory cgroup may be created here)"
        )
    if "max_cpu" in req and "max_cpu" not in plan.mechanisms:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = []
        if cpus:
            n = max(1, min(len(cpus), math.ceil(float(req["max_cpu"]) / 100.0)))
            plan.worker["affinity"] = cpus[:n]
            plan.mechanisms["max_cpu"] = (
                f"CPU affinity ({n} of {len(cpus)} CPUs; a share below one CPU is not "
                "enforced without cgroups)"
            )
            if float(req["max_cpu"]) % 100:
                plan.not_applied.setdefault(
                    "max_cpu",
                    f"{_show('max_cpu', req['max_cpu'])} rounded up to {n} whole CPU(s): "
                    "no cpu cgroup may be created here",
                )
        else:
            plan.not_applied["max_cpu"] = "neither a cpu cgroup nor CPU affinity is available"
    if "max_processes" in req and "max_processes" not in plan.mechanisms:
        rl["RLIMIT_NPROC"] = int(req["max_processes"])
        plan.mechanisms["max_processes"] = "RLIMIT_NPROC"
        if os.geteuid() == 0 and not req.get("sandboxed"):  # the sandbox runs as nobody
            plan.not_applied["max_processes"] = (
                "RLIMIT_NPROC does not bind root and no pids cgroup may be created here"
            )
    if "max_open_files" in req:
        rl["RLIMIT_NOFILE"] = int(req["max_open_files"])
        plan.mechanisms["max_open_files"] = "RLIMIT_NOFILE"
    if req.get("timeout") is not None:
        plan.mechanisms["timeout"] = "host timer (cancel, then SIGKILL and replace)"


def prepare(
    request: Mapping[str, Any], worker_id: str, env: dict[str, str]
) -> tuple[Plan | None, dict[str, str]]:
    """The plan for one worker and the environment it gets; ``(None, env)`` for no request.

    Raises :class:`IsolationError` when ``network = false`` cannot be honoured here.
    """
    if not request:
        return None, env
    caps = probe()
    plan = Plan(request)
    req = request
    try:
        if req.get("network") is False:
            if not caps.netns:
                raise IsolationError(
                    f"network = false cannot be honoured on this machine: "
                    f"{caps.why_not.get('netns', 'no network namespaces')}. Fix: run the host "
                    "where it may unshare a network namespace (root, or unprivileged user "
                    "namespaces enabled), or set network = true for this bridge"
                )
            plan.worker["network"] = False
            plan.mechanisms["network"] = "network namespace with only loopback (unshare)"
        _make_cgroups(plan, caps, worker_id, req)
        _fallbacks(plan, req)
        if req.get("private_tmp"):
            plan.workdir = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-{worker_id}-")
            plan.worker["workdir"] = plan.workdir
            plan.mechanisms["private_tmp"] = "private directory, removed on exit"
        if req.get("read_only"):
            if caps.mountns:
                plan.worker["read_only"] = True
                plan.mechanisms["read_only"] = "mount namespace, every mount remounted read-only"
            else:
                plan.not_applied["read_only"] = caps.why_not.get("mountns", "no mount namespace")
        if req.get("sandboxed") and os.geteuid() == 0:
            plan.worker["drop_to"] = [65534, 65534]  # nobody/nogroup: root's powers left behind
            if plan.workdir is not None:
                os.chown(plan.workdir, 65534, 65534)
            plan.mechanisms["user"] = "runs as uid 65534 (nobody), not as the host's root"
        env = _filter_env(req, env, plan)
    except BaseException:
        plan.cleanup_unstarted()
        raise
    limits = {k: req[k] for k in ("max_memory", "max_processes", "max_open_files") if k in req}
    plan.worker["limits"] = limits
    plan.worker["report"] = plan.report()
    env[ISOLATION_ENV] = plan.worker_json
    return plan, env


def _filter_env(req: Mapping[str, Any], env: dict[str, str], plan: Plan) -> dict[str, str]:
    out = env
    allow = req.get("env_allowlist")
    if allow is not None:
        keep = {*BASE_ENV, *_KEEP_ENV, *allow, *req.get("env_keys", ())}
        out = {k: v for k, v in env.items() if k in keep}
        names = ", ".join(sorted(allow))
        plan.mechanisms["env_allowlist"] = (
            f"host variables passed: {names or 'none'} (plus the interpreter's basics, such as "
            "PATH and PYTHONPATH, and the bridge's own env)"
        )
    if plan.workdir is not None:
        out = {**out, "TMPDIR": plan.workdir, "HOME": plan.workdir}
    return out


def describe_machine() -> dict[str, Any]:
    """For ``mlbridge doctor``: the mechanism each limit and isolation option gets here."""
    caps = probe()
    cg = f"cgroup v{caps.cgroup_version}" if caps.cgroup_version else None

    def via(ctrl: str, yes: str, no: str) -> str:
        return f"{cg} {yes}" if cg and ctrl in caps.cgroup_dirs else no

    root = os.geteuid() == 0
    mech = {
        "max_memory": via(
            "memory",
            "memory.max" if caps.cgroup_version == 2 else "memory.limit_in_bytes",
            "RLIMIT_AS + RLIMIT_DATA",
        ),
        "max_cpu": via(
            "cpu",
            "cpu.max" if caps.cgroup_version == 2 else "cpu.cfs_quota_us",
            "CPU affinity (whole CPUs)",
        ),
        "max_processes": via("pids", "pids.max", "RLIMIT_NPROC"),
        "max_open_files": "RLIMIT_NOFILE",
        "timeout": "host timer (cancel, then SIGKILL and replace)",
        "network": "network namespace (unshare)"
        if caps.netns
        else "refused: " + str(caps.why_not.get("netns")),
        "read_only": "mount namespace"
        if caps.mountns
        else "not applied: " + str(caps.why_not.get("mountns")),
        "env_allowlist": "environment filtered by the host",
        "private_tmp": "private directory, removed on exit",
    }
    weak = {}
    if "memory" not in caps.cgroup_dirs:
        weak["max_memory"] = "virtual memory only (RLIMIT_AS), not resident memory"
    if "cpu" not in caps.cgroup_dirs:
        weak["max_cpu"] = "rounded up to whole CPUs (affinity)"
    if "pids" not in caps.cgroup_dirs and root:
        weak["max_processes"] = "RLIMIT_NPROC does not bind root"
    if not caps.netns:
        weak["network"] = "bridges with network = false refuse to start"
    if not caps.mountns:
        weak["read_only"] = "no read-only view of the file system"
    return {
        "cgroup": cg or "none",
        "cgroup_dirs": dict(caps.cgroup_dirs),
        "mechanisms": mech,
        "not_applied": weak,  # as per bridge and in get_info
        "limited": dict(weak),  # the same, under its earlier name
        "why_not": dict(caps.why_not),
    }


def summarize(request: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a bridge asking for ``request`` would get here, without creating anything:
    ``limits``, the ``mechanisms`` in force, ``not_applied`` (limit -> why), and ``refused``
    (an option that stops the worker from starting). None for a bridge that asks for nothing."""
    if not request:
        return None
    machine = describe_machine()
    asked = {k: v for k, v in request.items() if k in SANDBOX_DEFAULTS}
    on = {"network": False, "read_only": True, "private_tmp": True}
    keys = [k for k, v in asked.items() if (v is on[k] if k in on else v is not None)]
    if request.get("timeout") is not None:
        keys.append("timeout")
    mechanisms = {k: machine["mechanisms"][k] for k in keys if k in machine["mechanisms"]}
    not_applied = {k: why for k, why in machine["limited"].items() if k in keys}
    if (
        "max_cpu" in asked
        and "cpu" not in probe().cgroup_dirs
        and float(asked["max_cpu"]) % 100
        and "max_cpu" not in not_applied
    ):
        not_applied["max_cpu"] = "rounded up to whole CPUs (affinity)"
    refused = None
    if request.get("network") is False and not probe().netns:
        refused = (
            "network = false cannot be honoured on this machine: "
            f"{probe().why_not.get('netns', 'no network namespaces')}"
        )
        not_applied.pop("network", None)
        mechanisms.pop("network", None)
    if request.get("sandboxed") and os.geteuid() == 0:
        mechanisms["user"] = "runs as uid 65534 (nobody), not as the host's root"
    return {
        "limits": asked,
        "mechanisms": mechanisms,
        "not_applied": not_applied,
        "refused": refused,
    }
