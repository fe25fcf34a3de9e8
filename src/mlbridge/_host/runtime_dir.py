"""The host's private runtime directory (worker records for the orphan reaper, later sockets).

Where: ``$MLBRIDGE_RUNTIME_DIR`` when set (used as given, never replaced by another), else
``$XDG_RUNTIME_DIR/mlbridge`` (a per-user tmpfs the login manager owns), else
``<tempdir>/mlbridge-<uid>``. A candidate that fails the checks below is refused with a warning;
the XDG one falls back to the temp-dir one, the other two leave the caller without a directory
(the reaper is then off: workers still die with their host through their pipes and the
parent-death signal, only the third line of defence is missing).

Checks, so that nobody else can plant or redirect our files:

- the parent must be a directory that only its owner (us or root) can write, or a sticky one
  such as ``/tmp`` (where others cannot rename or remove our entry);
- the directory itself is created with mode 0700 when missing, then opened with
  ``O_DIRECTORY | O_NOFOLLOW`` (a symlink there is refused, never followed) and checked through
  ``fstat`` on that open descriptor: a directory, owned by this user, writable by nobody else.
  Read/search bits for group or others are removed (only we could have written there); write bits
  for them mean someone else may already have planted entries, so the directory is refused.

Every later file operation goes through the descriptor (``dir_fd=``), so replacing the path by a
symlink after the check changes nothing. :meth:`RuntimeDir.subdir` applies the same checks one
level down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ENV_VAR", "RuntimeDir", "RuntimeDirError", "open_path", "open_runtime_dir"]

ENV_VAR = "MLBRIDGE_RUNTIME_DIR"

log = logging.getLogger("mlbridge.host")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class RuntimeDirError(OSError):
    """A runtime directory candidate failed a check (the message says which, and the fix)."""


@dataclass(slots=True)
class RuntimeDir:
    """An open, checked directory. ``fd`` stays valid until :meth:`close`."""

    path: str
    fd: int
    uid: int

    def subdir(self, name: str) -> RuntimeDir:
        """Create (0700) or open the checked subdirectory ``name``; raises RuntimeDirError."""
        return _open_checked(
            name, parent_fd=self.fd, shown=os.path.join(self.path, name), uid=self.uid
        )

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    __del__ = close


def open_runtime_dir(
    environ: Mapping[str, str] | None = None,
    *,
    tempdir: str | None = None,
    uid: int | None = None,
) -> RuntimeDir | None:
    """The first candidate that passes every check, or None (each refusal logged as a warning).

    ``environ``, ``tempdir`` and ``uid`` default to this process's (tests pass their own).
    """
    env = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    explicit = env.get(ENV_VAR)
    if explicit:
        candidates = [(explicit, f"set by {ENV_VAR}")]
    else:
        candidates = []
        xdg = env.get("XDG_RUNTIME_DIR")
        if xdg:
            candidates.append((os.path.join(xdg, "mlbridge"), "under XDG_RUNTIME_DIR"))
        base = tempdir if tempdir is not None else tempfile.gettempdir()
        candidates.append((os.path.join(base, f"mlbridge-{uid}"), "under the temp dir"))
    for i, (path, origin) in enumerate(candidates):
        try:
            return open_path(path, uid=uid)
        except RuntimeDirError as exc:
            nxt = (
                f"trying {candidates[i + 1][0]}"
                if i + 1 < len(candidates)
                else f"orphan reaping is off; point {ENV_VAR} at a private directory"
            )
            log.warning("refusing runtime directory %s (%s): %s; %s", path, origin, exc, nxt)
    return None


def open_path(path: str, *, uid: int | None = None) -> RuntimeDir:
    """Create (0700) or open the directory ``path`` with every check above; raises
    RuntimeDirError."""
    uid = os.getuid() if uid is None else uid
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RuntimeDirError(f"its parent {parent} cannot be opened ({exc.strerror})") from exc
    try:
        st = os.fstat(pfd)
        others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if others_write and not st.st_mode & stat.S_ISVTX:
            raise RuntimeDirError(
                f"its parent {parent} is writable by others and not sticky, so they could "
                "replace it"
            )
        if st.st_uid not in (uid, 0) and not st.st_mode & stat.S_ISVTX:
            raise RuntimeDirError(f"its parent {parent} belongs to uid {st.st_uid}")
        return _open_checked(name, parent_fd=pfd, shown=path, uid=uid)
    finally:
        os.close(pfd)


def _open_checked(name: str, *, parent_fd: int, shown: str, uid: int) -> RuntimeDir:
    if not name or "/" in name or name in (".", ".."):
        raise RuntimeDirError(f"{name!r} is not a plain directory name")
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except OSError as exc:
        raise RuntimeDirError(f"cannot stat it ({exc.strerror})") from exc
    if stat.S_ISLNK(st.st_mode):
        raise RuntimeDirError("it is a symlink (it is never followed)")
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise RuntimeDirError(f"cannot open it without following links ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)  # the directory we hold, whatever the path names by now
        if not stat.S_ISDIR(st.st_mode):
            raise RuntimeDirError("it is not a directory")
        if st.st_uid != uid:
            raise RuntimeDirError(f"it belongs to uid {st.st_uid}, not to this user (uid {uid})")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RuntimeDirError(
                f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), so "
                "its entries cannot be trusted; remove it or chmod 700 it after checking them"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)  # only we could write here: tightening is safe
    except BaseException:
        os.close(fd)
        raise
    return RuntimeDir(shown, fd, uid)
