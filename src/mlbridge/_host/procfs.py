"""Facts about processes from /proc, for the reaper's proof of identity (see .reaper)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "ProcStat",
    "alive_since",
    "all_pids",
    "has_env_entry",
    "pidfd",
    "proc_stat",
    "process_groups",
]


@dataclass(frozen=True, slots=True)
class ProcStat:
    state: str
    pgrp: int
    start: int


def proc_stat(pid: int) -> ProcStat | None:
    # os.open/os.read: this runs once per process on the machine in a group scan.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fields = os.read(fd, 4096).rsplit(b")", 1)[1].split()
        return ProcStat(fields[0].decode(), int(fields[2]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None
    finally:
        os.close(fd)


def has_env_entry(pid: int, entry: str) -> bool:
    """Whether ``NAME=value`` is in the process's environment (readable only by its owner)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:  # gone, or another user's process
        return False
    return entry.encode() in env.split(b"\0")


def alive_since(pid: int, start: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st.start == start and st.state not in ("Z", "X")


def all_pids() -> Iterator[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1


def process_groups() -> dict[int, list[int]]:
    """Process group -> its processes, from one pass over /proc."""
    groups: dict[int, list[int]] = {}
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None:
            groups.setdefault(st.pgrp, []).append(pid)
    return groups
