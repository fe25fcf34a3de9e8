"""Per-bridge Python environments, built with uv and cached by the hash of their resolved spec.

A bridge with ``[bridges.x.environment]`` runs its workers under the interpreter of a virtual
environment holding its ``packages`` plus what the worker runtime needs (orjson, msgpack; the
mlbridge package itself is put on the worker's PYTHONPATH by :mod:`mlbridge._host.pythonpath`).

Theory of operation
-------------------
:func:`resolve` turns an :class:`~mlbridge.config.EnvironmentSpec` into a
:class:`ResolvedEnvironment`: the interpreter request (the spec's ``python``, else the host's
interpreter), the index (the spec's ``index_url``, else the one pip uses on this machine: see
:func:`pip_index_settings`), the requirement lines and constraints. Its canonical JSON is
hashed; the environment lives in ``<cache>/envs/<hash>`` where ``<cache>`` is
``$MLBRIDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlbridge``, else ``~/.cache/mlbridge``. The
folder counts as built only when it holds ``mlbridge-env.json`` (written last).

:func:`build` takes ``<hash>.lock`` (``flock``; several hosts building the same environment wait
for one another, and the ones that waited find it built), builds into a private temporary folder
beside it (``uv venv --relocatable``, then ``uv pip install``), writes the marker and renames the
folder into place, so a crash leaves a ``.build-*`` folder (removed by :func:`prune`) and never a
half-built environment. uv's output is streamed line by line to the ``mlbridge.envs`` logger and
to a progress callback (the host turns it into ``progress`` telemetry events; the CLI into a
progress bar). A resolution failure becomes an :class:`EnvironmentBuildError` naming the
requirements uv says conflict.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import BridgeConfig, EnvironmentSpec
from .errors import EnvironmentCheckError

__all__ = [
    "MARKER",
    "BuildProgress",
    "BuildResult",
    "EnvironmentBuildError",
    "IndexSettings",
    "ResolvedEnvironment",
    "bridge_python",
    "build",
    "cache_root",
    "envs_dir",
    "find_uv",
    "list_environments",
    "pip_index_settings",
    "prune",
    "resolve",
]

log = logging.getLogger("mlbridge.envs")

MARKER = "mlbridge-env.json"
_FORMAT = 1
#: What the worker runtime needs inside the environment (mlbridge itself comes via PYTHONPATH).
RUNTIME_REQUIREMENTS = ("orjson>=3.9", "msgpack>=1.0")
_DEFAULT_INDEX = "https://pypi.org/simple"
_STEPS = 4  # create the venv, resolve+install, record, move into place


class EnvironmentBuildError(EnvironmentCheckError):
    """A bridge's environment could not be built (uv missing, resolution failed, ...)."""


@dataclass(frozen=True, slots=True)
class BuildProgress:
    """One step of a build: ``step`` of ``total``, with uv's latest line as ``message``."""

    bridge: str | None
    key: str
    step: int
    total: int
    message: str


ProgressCallback = Callable[[BuildProgress], None]


@dataclass(frozen=True, slots=True)
class IndexSettings:
    index_url: str
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ResolvedEnvironment:
    spec: EnvironmentSpec
    key: str
    path: Path
    python_request: str
    requirements: tuple[str, ...]
    index: IndexSettings

    @property
    def python(self) -> str:
        """The environment's interpreter (exists once built)."""
        return str(self.path / "bin" / "python")

    @property
    def built(self) -> bool:
        return (self.path / MARKER).is_file()

    def document(self) -> dict[str, Any]:
        """The resolved spec that is hashed (and recorded in the marker)."""
        return {
            "format": _FORMAT,
            "python": self.python_request,
            "requirements": list(self.requirements),
            "constraints": list(self.spec.constraints),
            "index_url": self.index.index_url,
            "extra_index_urls": list(self.index.extra_index_urls),
            "find_links": list(self.index.find_links),
        }


@dataclass(frozen=True, slots=True)
class BuildResult:
    env: ResolvedEnvironment
    built: bool  # False: it was already there (the cache was used)
    seconds: float


# --------------------------------------------------------------------------- locations


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """``$MLBRIDGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlbridge``, else ``~/.cache/mlbridge``."""
    env = os.environ if environ is None else environ
    if env.get("MLBRIDGE_CACHE_DIR"):
        return Path(env["MLBRIDGE_CACHE_DIR"]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "mlbridge"
    return Path.home() / ".cache" / "mlbridge"


def envs_dir(environ: Mapping[str, str] | None = None) -> Path:
    return cache_root(environ) / "envs"


def find_uv() -> str:
    """The uv executable: the ``uv`` package's (the ``envs`` extra), else ``uv`` on PATH."""
    try:
        import uv  # type: ignore[import-untyped,import-not-found,unused-ignore]

        found = str(uv.find_uv_bin())
        if os.access(found, os.X_OK):
            return found
    except (ImportError, FileNotFoundError, AttributeError):
        pass
    on_path = shutil.which("uv")
    if on_path:
        return on_path
    raise EnvironmentBuildError(
        "building a bridge environment needs uv, which is not installed here. "
        "Fix: pip install 'mlbridge[envs]' (or put uv on PATH)"
    )


# --------------------------------------------------------------------------- pip's index


def _split(value: str) -> list[str]:
    return [v for v in value.split() if v]


def _pip_config_files(env: Mapping[str, str]) -> list[Path]:
    """pip's configuration files, lowest priority first (see ``pip config debug``)."""
    if env.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    dirs = env.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [Path(d) / "pip" / "pip.conf" for d in dirs.split(os.pathsep) if d]
    files.append(Path("/etc/pip.conf"))
    home = Path(env.get("HOME") or Path.home())
    files.append(home / ".pip" / "pip.conf")
    files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "pip" / "pip.conf")
    files.append(Path(sys.prefix) / "pip.conf")
    if env.get("PIP_CONFIG_FILE"):
        files.append(Path(env["PIP_CONFIG_FILE"]))
    return files


def pip_index_settings(environ: Mapping[str, str] | None = None) -> IndexSettings:
    """The index pip uses here: its config files' ``[global]``/``[install]`` ``index-url``,
    ``extra-index-url`` and ``find-links``, then ``PIP_INDEX_URL`` and friends over them."""
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for path in _pip_config_files(env):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                for key, value in parser.items(section):
                    values[key.replace("_", "-")] = value
    for key in ("index-url", "extra-index-url", "find-links"):
        var = "PIP_" + key.upper().replace("-", "_")
        if env.get(var):
            values[key] = env[var]
    index = _split(values.get("index-url", "")) or [_DEFAULT_INDEX]
    return IndexSettings(
        index_url=index[0],
        extra_index_urls=tuple(_split(values.get("extra-index-url", ""))),
        find_links=tuple(_split(values.get("find-links", ""))),
    )


# --------------------------------------------------------------------------- resolving


def _host_python() -> str:
    return f"{os.path.realpath(sys.executable)}"


@functools.lru_cache(maxsize=256)
def _resolve(spec: EnvironmentSpec, root: str, index_env: tuple[tuple[str, str], ...]) -> Any:
    index = (
        IndexSettings(spec.index_url)
        if spec.index_url is not None
        else pip_index_settings(dict(index_env))
    )
    requirements = (*spec.packages, *RUNTIME_REQUIREMENTS)
    env = ResolvedEnvironment(
        spec=spec,
        key="",
        path=Path(root),
        python_request=spec.python or _host_python(),
        requirements=requirements,
        index=index,
    )
    blob = json.dumps(env.document(), sort_keys=True).encode()
    key = hashlib.sha256(blob).hexdigest()[:20]
    return dataclasses.replace(env, key=key, path=Path(root) / key)


def resolve(spec: EnvironmentSpec, environ: Mapping[str, str] | None = None) -> ResolvedEnvironment:
    """The spec with its interpreter and index settled, its hash, and its folder."""
    env = os.environ if environ is None else environ
    index_env = tuple(
        sorted((k, v) for k, v in env.items() if k.startswith(("PIP_", "XDG_")) or k == "HOME")
    )
    result: ResolvedEnvironment = _resolve(spec, str(envs_dir(env)), index_env)
    return result


def bridge_python(cfg: BridgeConfig) -> str:
    """The interpreter ``cfg``'s workers run under: its environment's when it has one."""
    if cfg.environment is None:
        return cfg.python
    return resolve(cfg.environment).python


# --------------------------------------------------------------------------- building


_lock_guard = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def _locked(root: Path, key: str, timeout: float) -> Any:
    """Hold ``<root>/<key>.lock`` (flock across processes, a lock across this one's threads)."""
    with _lock_guard:
        tlock = _thread_locks.setdefault(key, threading.Lock())
    deadline = time.monotonic() + timeout
    if not tlock.acquire(timeout=timeout):
        raise EnvironmentBuildError(
            f"another thread has been building environment {key} for over {timeout:g}s. "
            "Fix: wait for it, or raise the build timeout"
        )
    try:
        fd = os.open(root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        log.info("environment %s: waiting for another build of it", key)
                        waited = True
                    if time.monotonic() > deadline:
                        raise EnvironmentBuildError(
                            f"another process has held the build lock of environment {key} "
                            f"for over {timeout:g}s ({root / (key + '.lock')}). Fix: wait for "
                            "that build, or stop the process holding it"
                        ) from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)  # releases the flock
    finally:
        tlock.release()


def build(
    spec: EnvironmentSpec,
    *,
    bridge: str | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = 900.0,
    rebuild: bool = False,
) -> BuildResult:
    """Make sure the environment of ``spec`` exists; build it if not (blocking)."""
    started = time.monotonic()
    env = resolve(spec)
    if env.built and not rebuild:
        return BuildResult(env, False, time.monotonic() - started)
    root = env.path.parent
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root, env.key, timeout):
        if env.built and not rebuild:  # another host built it while we waited
            log.info("environment %s: built by another process meanwhile; reusing it", env.key)
            return BuildResult(env, False, time.monotonic() - started)
        _build_locked(env, bridge, progress, started + timeout)
    return BuildResult(env, True, time.monotonic() - started)


def _report(
    progress: ProgressCallback | None,
    env: ResolvedEnvironment,
    bridge: str | None,
    step: int,
    msg: str,
) -> None:
    log.info(
        "environment %s%s [%d/%d] %s", env.key, f" ({bridge})" if bridge else "", step, _STEPS, msg
    )
    if progress is not None:
        try:
            progress(BuildProgress(bridge, env.key, step, _STEPS, msg))
        except Exception:  # a progress display must never break the build
            log.exception("progress callback failed")


def _build_locked(
    env: ResolvedEnvironment, bridge: str | None, progress: ProgressCallback | None, deadline: float
) -> None:
    uv = find_uv()
    root = env.path.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{env.key}-", dir=root))
    venv = tmp / "venv"
    try:
        _report(progress, env, bridge, 1, f"creating a virtual environment ({env.python_request})")
        _run_uv(
            [uv, "venv", "--no-config", "--relocatable", "--python", env.python_request, str(venv)],
            env,
            bridge,
            progress,
            1,
            deadline,
            cwd=tmp,
        )
        argv = [uv, "pip", "install", "--no-config", "--python", str(venv / "bin" / "python")]
        argv += ["--index-url", env.index.index_url]
        for url in env.index.extra_index_urls:
            argv += ["--extra-index-url", url]
        for link in env.index.find_links:
            argv += ["--find-links", link]
        argv += ["--index-strategy", "unsafe-best-match"]
        if env.spec.constraints:
            cfile = tmp / "constraints.txt"
            cfile.write_text("\n".join(env.spec.constraints) + "\n", encoding="utf-8")
            argv += ["--constraint", str(cfile)]
        argv += list(env.requirements)
        _report(
            progress,
            env,
            bridge,
            2,
            f"resolving and installing {len(env.requirements)} requirements",
        )
        _run_uv(argv, env, bridge, progress, 2, deadline, cwd=tmp)
        _report(progress, env, bridge, 3, "recording what was installed")
        freeze = subprocess.run(
            [uv, "pip", "freeze", "--no-config", "--python", str(venv / "bin" / "python")],
            capture_output=True,
            text=True,
            cwd=tmp,
            env=_uv_env(),
            check=False,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        marker = env.document() | {
            "key": env.key,
            "packages": list(env.spec.packages),
            "installed": freeze.stdout.split(),
            "built_at": time.time(),
            "builder_pid": os.getpid(),
        }
        (venv / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        _report(progress, env, bridge, 4, f"moving it into place at {env.path}")
        if env.path.exists():  # a folder without a marker (or a rebuild): replace it
            stale = root / f".stale-{env.key}-{os.getpid()}"
            os.rename(env.path, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(venv, env.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _uv_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    env.setdefault("UV_NO_PROGRESS", "1")
    return env


def _run_uv(
    argv: list[str],
    env: ResolvedEnvironment,
    bridge: str | None,
    progress: ProgressCallback | None,
    step: int,
    deadline: float,
    *,
    cwd: Path,
) -> None:
    lines: list[str] = []
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=_uv_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), proc.kill)
    timer.daemon = True
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            lines.append(line)
            log.info("environment %s: uv: %s", env.key, line)
            if progress is not None:
                with contextlib.suppress(Exception):
                    progress(BuildProgress(bridge, env.key, step, _STEPS, line))
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    if code == 0:
        return
    if time.monotonic() >= deadline:
        raise EnvironmentBuildError(
            f"{_who(bridge, env)}: uv did not finish within the build timeout. "
            "Fix: check the network and index, or raise the timeout",
            bridge=bridge,
        )
    raise _failure(env, bridge, lines, code)


def _who(bridge: str | None, env: ResolvedEnvironment) -> str:
    return f"bridge {bridge!r}: environment {env.key}" if bridge else f"environment {env.key}"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip())
    return _norm(m.group(0)) if m else req


def _failure(
    env: ResolvedEnvironment, bridge: str | None, lines: list[str], code: int
) -> EnvironmentBuildError:
    text = "\n".join(lines)
    detail = [ln.strip() for ln in lines if not ln.startswith(("Using ", "Resolved ", "Creating "))]
    summary = " ".join(detail)[-1500:].rstrip(".") or f"uv exited with status {code}"
    lowered = _norm(text)
    named = [
        req
        for req in (*env.spec.packages, *env.spec.constraints)
        if re.search(rf"(?<![a-z0-9-]){re.escape(_req_name(req))}(?![a-z0-9])", lowered)
    ]
    where = f"[bridges.{bridge}.environment]" if bridge else "the environment's"
    if "No solution found" in text or "unsatisfiable" in text:
        conflict = ", ".join(repr(r) for r in named) or "see uv's explanation"
        message = (
            f"{_who(bridge, env)} cannot be resolved: conflicting requirement(s) {conflict}. "
            f"uv says: {summary}. Fix: change or drop the conflicting pins in {where} packages / "
            "constraints"
        )
    else:
        message = (
            f"{_who(bridge, env)} could not be built (uv exited with status {code}): {summary}. "
            f"Fix: check {where} packages, the index ({env.index.index_url}) and the network"
        )
    return EnvironmentBuildError(message, bridge=bridge, conflicting=named, uv_output=text[-4000:])


# --------------------------------------------------------------------------- list / prune


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def list_environments(environ: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Every built environment in the cache: key, path, packages, python, built_at, size."""
    root = envs_dir(environ)
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            marker = json.loads((entry / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out.append(
            {
                "key": entry.name,
                "path": str(entry),
                "python": marker.get("python"),
                "packages": marker.get("packages", []),
                "installed": marker.get("installed", []),
                "built_at": marker.get("built_at"),
                "size_bytes": _dir_size(entry),
            }
        )
    return out


def prune(
    keep: Iterable[str] = (), environ: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Remove every cached environment whose key is not in ``keep``, and leftovers of crashed
    builds; an environment being built right now (its lock held) is left alone."""
    root = envs_dir(environ)
    keep = set(keep)
    removed: list[dict[str, Any]] = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        key = entry.name
        if key.startswith((".build-", ".stale-")):
            key = key.split("-")[1]
        elif key.startswith(".") or key in keep:
            continue
        fd = os.open(root / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being built: not ours to remove
            size = _dir_size(entry)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append({"key": entry.name, "path": str(entry), "size_bytes": size})
            if not entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    os.unlink(root / f"{key}.lock")
        finally:
            os.close(fd)
    return removed
