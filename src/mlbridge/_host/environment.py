"""Whether a bridge can run here: its interpreter, its module, its packages, its env vars.

:func:`validate_environment` asks *the bridge's* interpreter, in one subprocess with a timeout,
whether it runs, which Python it is, whether it can import the mlbridge worker runtime, find the
bridge's module (``importlib.util.find_spec``), compile its script, and find each required
package. Positive answers are cached per interpreter (and PYTHONPATH); anything missing is asked
again next time, so installing a package fixes the check without a restart. Env vars are checked
in the host: the worker inherits the host's environment plus ``cfg.env``
(:func:`worker_environment`). ``mlbridge doctor`` also asks for ``import_bridge``: the bridge is
then imported for real in a short-lived probe process (:mod:`.import_probe`), because a module
that is found can still fail to import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .._envs import bridge_python, resolve
from ..config import BridgeConfig
from ..errors import EnvironmentCheckError
from .builtins import BUILTIN_BRIDGES, BUILTIN_REQUIREMENTS, builtin_module
from .extras import builtin_extra
from .import_probe import probe_import
from .pythonpath import mlbridge_path_entry

__all__ = [
    "EnvironmentProblem",
    "check_environment",
    "clear_environment_cache",
    "validate_environment",
    "worker_environment",
]

ProblemKind = Literal["interpreter", "module", "package", "env", "isolation", "import"]

_MIN_PYTHON = (3, 11)
_PROBE_MARKER = "MLBRIDGE-PROBE "
# Import name -> distribution name, where they differ by more than '_' vs '-'.
_DISTRIBUTIONS = {
    "PIL": "pillow",
    "bs4": "beautifulsoup4",
    "cv2": "opencv-python",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
}


@dataclass(frozen=True, slots=True)
class EnvironmentProblem:
    """One reason a bridge cannot run here, and what to do about it."""

    bridge: str
    kind: ProblemKind
    message: str
    fix: str
    traceback: str | None = None  # kind "import": the tail of the import's traceback

    def __str__(self) -> str:
        return f"[{self.bridge}] {self.message}. Fix: {self.fix}"


def worker_environment(
    cfg: BridgeConfig, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a worker of ``cfg`` gets: the host's, plus ``cfg.env``, plus — when the
    interpreter is not the host's — a PYTHONPATH entry holding this mlbridge package and nothing
    else (never the host's site-packages: see :mod:`.pythonpath`)."""
    env = dict(os.environ if environ is None else environ)
    env.update(cfg.env)
    python = bridge_python(cfg)  # a bridge's own environment shares the host's base interpreter
    if cfg.environment is not None or (
        os.path.realpath(_which(python, env) or python) != os.path.realpath(sys.executable)
    ):
        entry = mlbridge_path_entry()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [entry, env.get("PYTHONPATH")]))
    return env


def check_environment(
    cfg: BridgeConfig, *, environ: Mapping[str, str] | None = None, timeout: float = 30.0
) -> None:
    """Raise :class:`EnvironmentCheckError` listing every problem :func:`validate_environment`
    finds (its ``details["problems"]`` holds them)."""
    problems = validate_environment(cfg, environ=environ, timeout=timeout)
    if problems:
        lines = "\n".join(f"  - {p.kind}: {p.message}. Fix: {p.fix}" for p in problems)
        raise EnvironmentCheckError(
            f"bridge {cfg.name!r} cannot run in this environment "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n{lines}",
            bridge=cfg.name,
            problems=problems,
        )


def validate_environment(
    cfg: BridgeConfig,
    *,
    environ: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    import_bridge: bool = False,
    import_timeout: float = 60.0,
) -> list[EnvironmentProblem]:
    """Everything that would stop ``cfg``'s workers from starting, found without starting one.

    With ``import_bridge`` (``mlbridge doctor``), a bridge whose module and packages are found
    is then imported for real in its own interpreter (:mod:`.import_probe`, within
    ``import_timeout`` seconds): an import that fails is a problem of kind ``"import"`` carrying
    the error and its traceback's tail.

    Blocking (it runs the bridge's interpreter once, unless every answer is cached; twice with
    ``import_bridge``): from async code call it through ``asyncio.to_thread``.
    """
    host_env = os.environ if environ is None else environ
    problems: list[EnvironmentProblem] = []

    def problem(kind: ProblemKind, message: str, fix: str) -> None:
        problems.append(EnvironmentProblem(cfg.name, kind, message, fix))

    def problem_with_tb(message: str, fix: str, tb: str) -> None:
        problems.append(EnvironmentProblem(cfg.name, "import", message, fix, tb or None))

    for var in cfg.required_env:
        value = cfg.env.get(var, host_env.get(var))
        if value is None or value == "":
            state = "is empty" if value == "" else "is not set"
            problem(
                "env",
                f"required environment variable {var} {state}",
                f"export {var}=... before starting the host, or set bridges.{cfg.name}.env.{var}",
            )

    env = worker_environment(cfg, host_env)
    if cfg.environment is not None:  # probe the bridge's own environment (issue 14)
        built = resolve(cfg.environment)
        if not built.built:
            problem(
                "interpreter",
                f"the environment of bridge {cfg.name!r} is not built yet ({built.path})",
                f"run `mlbridge env build {cfg.name}`, or start the bridge (the host builds it)",
            )
            return problems
        cfg = dataclasses.replace(cfg, python=built.python)
    python = _which(cfg.python, env)
    if python is None:
        problem(
            "interpreter",
            f"interpreter {cfg.python!r} does not exist or is not executable",
            f"install it, or set bridges.{cfg.name}.python to an existing interpreter "
            f"(the host's is {sys.executable})",
        )
        return problems

    module, script = _target(cfg)
    packages = tuple(dict.fromkeys((*_builtin_requirements(cfg), *cfg.required_packages)))
    if script is not None and not os.path.isfile(script):
        problem(
            "module",
            f"bridge script {script!r} does not exist",
            f"create it, or fix bridges.{cfg.name}.python_script (relative paths resolve "
            "against the config file's folder, else the working directory)",
        )
        script = None

    answer = _probe(python, env, [m for m in (module, *packages) if m], script, timeout)
    if isinstance(answer, str):
        problem(
            "interpreter",
            f"interpreter {cfg.python!r} {answer}",
            f"check that `{cfg.python} -c pass` works, or set bridges.{cfg.name}.python "
            "to a working interpreter",
        )
        return problems

    version = tuple(answer["version"])
    if version < _MIN_PYTHON:
        problem(
            "interpreter",
            f"interpreter {cfg.python!r} is Python {'.'.join(map(str, version))}; mlbridge "
            f"workers need {'.'.join(map(str, _MIN_PYTHON))} or newer",
            f"set bridges.{cfg.name}.python to a newer interpreter",
        )
    if answer["mlbridge"] is not None:
        problem(
            "package",
            f"the mlbridge worker runtime is not importable by {cfg.python}: {answer['mlbridge']}",
            f"install mlbridge into that interpreter ({cfg.python} -m pip install mlbridge) "
            "with its dependencies",
        )
    if module is not None and answer["modules"].get(module) is not None:
        if cfg.python_module in BUILTIN_BRIDGES:
            fix = (
                f"the mlbridge seen by {cfg.python} lacks the built-in bridge "
                f"{cfg.python_module!r}: install a complete, current mlbridge there"
            )
        else:
            fix = (
                "install the package that provides it into that interpreter, add its folder to "
                f"PYTHONPATH (bridges.{cfg.name}.env.PYTHONPATH), or fix "
                f"bridges.{cfg.name}.python_module"
            )
        problem(
            "module",
            f"module {module!r} (bridge {cfg.target!r}) is not importable by {cfg.python}: "
            f"{answer['modules'][module]}",
            fix,
        )
    if script is not None and answer["script"] is not None:
        problem(
            "module",
            f"bridge script {script!r} does not compile under {cfg.python}: {answer['script']}",
            "fix the script (its syntax must suit that interpreter's Python version)",
        )
    for pkg in packages:
        error = answer["modules"].get(pkg)
        if error is not None:
            top = pkg.partition(".")[0]
            dist = _DISTRIBUTIONS.get(top, top.replace("_", "-"))
            extra = builtin_extra(cfg.python_module or "") if cfg.python_script is None else None
            fix = f"{cfg.python} -m pip install {dist}"
            if extra is not None and pkg in _builtin_requirements(cfg):
                fix = f"{cfg.python} -m pip install 'mlbridge[{extra}]' (or just {dist})"
            problem(
                "package",
                f"required package {pkg!r} is not importable by {cfg.python}: {error}",
                fix,
            )
    if import_bridge and all(p.kind == "env" for p in problems):
        _import_problems(cfg, python, env, packages, import_timeout, problem_with_tb)
    return problems


def _import_problems(
    cfg: BridgeConfig,
    python: str,
    env: Mapping[str, str],
    packages: tuple[str, ...],
    timeout: float,
    add: Callable[[str, str, str], None],
) -> None:
    """Import the bridge and its packages in ``python`` and report each failure."""
    for failure in probe_import(python, env, cfg.target, packages, timeout):
        if failure.what == "bridge":
            where = (
                f"bridge script {cfg.python_script!r}"
                if cfg.python_script is not None
                else f"bridge module {cfg.target!r}"
            )
            add(
                f"{where} is found but does not import under {cfg.python}: {failure.error}",
                "fix the error at the bottom of the traceback (a missing dependency: install it "
                f"into {cfg.python}; an error in the bridge's code: correct it), then run "
                "`mlbridge doctor` again",
                failure.traceback_tail,
            )
        else:
            top = failure.what.partition(".")[0]
            dist = _DISTRIBUTIONS.get(top, top.replace("_", "-"))
            add(
                f"required package {failure.what!r} is installed but does not import under "
                f"{cfg.python}: {failure.error}",
                f"repair it, e.g. {cfg.python} -m pip install --force-reinstall {dist}",
                failure.traceback_tail,
            )


def clear_environment_cache() -> None:
    """Forget cached probe answers (after installing into an interpreter in-process)."""
    with _cache_lock:
        _cache.clear()


# --------------------------------------------------------------------------- probing

# Run by the bridge's interpreter: must stay valid on old Pythons (so it can report them).
_PROBE = r"""
import importlib, importlib.util, json, sys
req = json.loads(sys.argv[1])
out = {"version": list(sys.version_info[:3]), "modules": {}, "mlbridge": None, "script": None}
def why(exc):
    return "%s: %s" % (type(exc).__name__, exc)
if req["mlbridge"]:
    try:
        importlib.import_module("mlbridge._worker.entry")
    except BaseException as exc:
        out["mlbridge"] = why(exc)
for name in req["modules"]:
    try:
        out["modules"][name] = None if importlib.util.find_spec(name) else "not found"
    except BaseException as exc:
        out["modules"][name] = why(exc)
if req["script"]:
    try:
        with open(req["script"], "rb") as f:
            compile(f.read(), req["script"], "exec", dont_inherit=True)
    except BaseException as exc:
        out["script"] = why(exc)
sys.stdout.write("\n" + req["marker"] + json.dumps(out) + "\n")
"""

# (interpreter, PYTHONPATH, PYTHONHOME) -> the names it is known to find (and the runtime/version)
_cache: dict[tuple[str, str, str], dict[str, Any]] = {}
_cache_lock = threading.Lock()


def _probe(
    python: str, env: Mapping[str, str], modules: list[str], script: str | None, timeout: float
) -> dict[str, Any] | str:
    """The interpreter's answer, or a string saying why it gave none."""
    key = (python, env.get("PYTHONPATH", ""), env.get("PYTHONHOME", ""))
    with _cache_lock:
        known = _cache.get(key)
        found: set[str] = set(known["found"]) if known else set()
    ask = [m for m in dict.fromkeys(modules) if m not in found]
    if known is not None and not ask and script is None:
        return {**known["answer"], "modules": dict.fromkeys(modules)}
    request = {
        "modules": ask,
        "script": script,
        "mlbridge": known is None,
        "marker": _PROBE_MARKER,
    }
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE, json.dumps(request)],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"did not answer within {timeout:g}s"
    except OSError as exc:
        return f"cannot be run: {exc}"
    line = next(
        (ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(_PROBE_MARKER)), None
    )
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed to run a probe (exit {proc.returncode}): {tail}"
    try:
        answer: dict[str, Any] = json.loads(line[len(_PROBE_MARKER) :])
    except ValueError:
        return "gave an unreadable probe answer"
    if known is not None:
        answer["mlbridge"] = known["answer"]["mlbridge"]
    ok = {m for m, err in answer["modules"].items() if err is None}
    if answer["mlbridge"] is None:  # only cache an interpreter that can run workers at all
        with _cache_lock:
            entry = _cache.setdefault(
                key, {"found": set(), "answer": {"version": answer["version"], "mlbridge": None}}
            )
            entry["found"] |= ok
    answer["modules"] = {m: answer["modules"].get(m) for m in modules}
    return answer


def _which(python: str, env: Mapping[str, str]) -> str | None:
    if os.sep in python:
        return python if os.path.isfile(python) and os.access(python, os.X_OK) else None
    return shutil.which(python, path=env.get("PATH"))


def _target(cfg: BridgeConfig) -> tuple[str | None, str | None]:
    """(module to find, script file to compile) for the bridge."""
    if cfg.python_script is not None:
        path = cfg.python_script
        head, sep, tail = path.rpartition(":")
        if sep and tail.isidentifier() and head.endswith(".py"):
            path = head
        return None, os.path.expanduser(path)
    spec = cfg.python_module or cfg.name
    if spec in BUILTIN_BRIDGES:
        return builtin_module(spec), None
    return spec.partition(":")[0], None


def _builtin_requirements(cfg: BridgeConfig) -> tuple[str, ...]:
    spec = cfg.python_module if cfg.python_script is None else None
    return BUILTIN_REQUIREMENTS.get(spec or "", ())
