"""Import a bridge for real, in the bridge's own interpreter, in a short-lived probe process.

:func:`~mlbridge._host.environment.validate_environment` only asks ``find_spec`` whether a module
*exists*; a module that exists can still fail to import (a missing dependency inside it, a syntax
error, an exception at import time, a class name that is not there). ``mlbridge doctor`` wants
the truth, so :func:`probe_import` runs the bridge's interpreter once with the worker's
environment and has it do what a worker does first: ``load_bridge_class(target)`` (the very
function ``python -m mlbridge.worker`` calls), then import each required package.

The probe runs in its own session and process group with a timeout; on timeout the whole group
is killed, so an import that hangs (or starts helpers) leaves nothing behind. Its answer is one
marker line on stdout, so whatever the imported code prints cannot be mistaken for it. The
traceback of a failed import comes back as text and is cut to its last lines (the part that says
where and why), never pickled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["TRACEBACK_TAIL_LINES", "ImportFailure", "probe_import"]

TRACEBACK_TAIL_LINES = 12
_MARKER = "MLBRIDGE-IMPORT-PROBE "

# Run by the bridge's interpreter (which has at least mlbridge's worker runtime on its path).
_PROBE = r"""
import importlib, json, sys, traceback
req = json.loads(sys.argv[1])
out = {"bridge": None, "packages": {}}
def failure(exc):
    return {"error": "%s: %s" % (type(exc).__name__, exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
try:
    from mlbridge._worker.entry import load_bridge_class
    cls = load_bridge_class(req["target"])
except BaseException as exc:
    out["bridge"] = failure(exc)
for name in req["packages"]:
    try:
        importlib.import_module(name)
    except BaseException as exc:
        out["packages"][name] = failure(exc)
sys.stdout.flush()
sys.stdout.write("\n" + req["marker"] + json.dumps(out) + "\n")
sys.stdout.flush()
"""


@dataclass(frozen=True, slots=True)
class ImportFailure:
    """What failed to import (``"bridge"`` or a package name), why, and the traceback's tail."""

    what: str
    error: str
    traceback_tail: str


def _tail(text: str, lines: int = TRACEBACK_TAIL_LINES) -> str:
    """The last ``lines`` lines of a traceback, without the import machinery's own frames."""
    kept: list[str] = []
    skip_source = False
    for line in text.rstrip().splitlines():
        if line.startswith('  File "<frozen importlib'):
            skip_source = True
            continue
        if skip_source and line.startswith("    "):
            continue
        skip_source = False
        kept.append(line)
    if len(kept) > lines:
        kept = [f"... ({len(kept) - lines} earlier traceback lines not shown)", *kept[-lines:]]
    return "\n".join(kept)


def probe_import(
    python: str,
    env: Mapping[str, str],
    target: str,
    packages: Sequence[str],
    timeout: float,
) -> list[ImportFailure]:
    """Import ``target`` (as ``python -m mlbridge.worker target`` would) and ``packages`` under
    ``python``; every failure, empty when all imported. Blocking: runs one subprocess."""
    request = {"target": target, "packages": list(packages), "marker": _MARKER}
    try:
        proc = subprocess.Popen(
            [python, "-c", _PROBE, json.dumps(request)],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        return [ImportFailure("bridge", f"the import probe could not be started: {exc}", "")]
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)  # the import and whatever it started in its group
        return [
            ImportFailure(
                "bridge",
                f"importing bridge {target!r} did not finish within {timeout:g}s "
                "(an import that hangs, or a very slow one on a loaded machine)",
                "",
            )
        ]
    line = next((ln for ln in reversed(stdout.splitlines()) if ln.startswith(_MARKER)), None)
    if line is None:
        tail = _tail(stderr) or "(no output)"
        return [
            ImportFailure(
                "bridge",
                f"the interpreter exited (status {proc.returncode}) while importing bridge "
                f"{target!r}, before it could answer",
                tail,
            )
        ]
    answer = json.loads(line[len(_MARKER) :])
    failures = []
    if answer["bridge"] is not None:
        failures.append(
            ImportFailure("bridge", answer["bridge"]["error"], _tail(answer["bridge"]["traceback"]))
        )
    for name, info in answer["packages"].items():
        failures.append(ImportFailure(name, info["error"], _tail(info["traceback"])))
    return failures


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the probe's process group; called before the probe is reaped, so its pid (the
    group's id) cannot have been reused."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.communicate()  # reap it and close the pipes
