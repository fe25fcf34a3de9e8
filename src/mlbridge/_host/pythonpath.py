"""The one PYTHONPATH entry that shows a bridge's own interpreter this mlbridge, and nothing else.

A bridge may run under another interpreter (``python = ...``, a per-bridge environment) that has
no mlbridge installed. Its workers still need the worker runtime, so the host puts a folder on
their ``PYTHONPATH``; that folder must hold the ``mlbridge`` package *only*: in a wheel install
the package's parent is the host's site-packages, and putting that on the path would let the
host's packages shadow the bridge's own (the very conflict separate interpreters exist to avoid).

* Source checkouts and editable installs (``src/mlbridge``): the parent holds nothing else to
  import, so it is used as it is.
* Otherwise: a folder in the user's private runtime directory (``pythonpath/<hash>``, checked and
  0700, see :mod:`.runtime_dir`) holding one symlink, ``mlbridge`` -> this package; reused by
  later hosts, so nothing is left behind. Without a usable runtime directory, a fresh private
  temporary folder is made for this process and removed at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import shutil
import tempfile

from .runtime_dir import RuntimeDirError, open_runtime_dir

__all__ = ["PACKAGE_DIR", "mlbridge_path_entry"]

#: the folder of this mlbridge package (``.../mlbridge``)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HARMLESS_SUFFIXES = (".egg-info", ".dist-info", ".egg-link", ".pth")


def _holds_only_mlbridge(folder: str) -> bool:
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return all(
        n in ("mlbridge", "__pycache__") or n.endswith(_HARMLESS_SUFFIXES) or n.startswith(".")
        for n in names
    )


@functools.cache
def mlbridge_path_entry() -> str:
    """A folder whose only importable entry is this mlbridge package."""
    parent = os.path.dirname(PACKAGE_DIR)
    if _holds_only_mlbridge(parent):
        return parent
    name = hashlib.sha256(PACKAGE_DIR.encode()).hexdigest()[:16]
    rd = open_runtime_dir()
    if rd is not None:
        try:
            outer = rd.subdir("pythonpath")
            try:
                inner = outer.subdir(name)
            finally:
                outer.close()
            try:
                _link(inner.fd)
                return inner.path
            finally:
                inner.close()
        except (RuntimeDirError, OSError):
            pass
        finally:
            rd.close()
    folder = tempfile.mkdtemp(prefix="mlbridge-pythonpath-")  # 0700, unpredictable
    os.symlink(PACKAGE_DIR, os.path.join(folder, "mlbridge"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _link(dir_fd: int) -> None:
    """``mlbridge`` -> PACKAGE_DIR inside the (checked, private) folder ``dir_fd``."""
    try:
        current = os.readlink("mlbridge", dir_fd=dir_fd)
    except FileNotFoundError:
        current = None
    except OSError:  # something that is not a symlink: replace it
        with contextlib.suppress(OSError):
            os.unlink("mlbridge", dir_fd=dir_fd)
        current = None
    if current == PACKAGE_DIR:
        return
    if current is not None:
        os.unlink("mlbridge", dir_fd=dir_fd)
    os.symlink(PACKAGE_DIR, "mlbridge", dir_fd=dir_fd)
