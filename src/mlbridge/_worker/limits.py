"""Process limits a worker applies to itself before importing any framework."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

__all__ = ["apply_limits", "die_with_parent", "set_threads"]

_LIMITS = {
    "address_space_bytes": resource.RLIMIT_AS,
    "cpu_seconds": resource.RLIMIT_CPU,
    "open_files": resource.RLIMIT_NOFILE,
}


def apply_limits(limits: dict[str, int]) -> None:
    """Set soft (and, when lowering, hard) rlimits named in ``limits``; unknown keys are errors."""
    for key, value in limits.items():
        which = _LIMITS.get(key)
        if which is None:
            raise ValueError(f"unknown worker limit {key!r}; known: {sorted(_LIMITS)}")
        _soft, hard = resource.getrlimit(which)
        new_hard = hard if hard == resource.RLIM_INFINITY or hard >= value else value
        resource.setrlimit(which, (int(value), new_hard))


def set_threads(n: int) -> None:
    """Cap BLAS/OpenMP/torch thread pools (only effective before those libraries load)."""
    for var in (
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    ):
        os.environ[var] = str(n)


def die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this worker when the host dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The host may have died between our fork and the prctl call.
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)
