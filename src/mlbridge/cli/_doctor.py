"""``mlbridge doctor`` and ``mlbridge list``: what would stop a bridge, found without starting it.

Both load the config the way every command does, then ask
:func:`~mlbridge._host.registry.validate_environment` about each bridge: its interpreter (runs,
new enough, has the mlbridge worker runtime), its module or script, its required packages and its
required environment variables. ``doctor`` then imports each bridge for real in the bridge's own
interpreter (a short-lived probe process with a timeout) and reports an import that fails with
its error and the tail of its traceback. A config that does not load is itself the problem,
reported with its key path (every error in the file at once).

Built-in bridges the config does not name are shown only when they ship in this mlbridge
(derived from :data:`mlbridge._builtin_bridges.BUILTIN_BRIDGES`), with the extra that installs
their packages.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .._backends import isolation
from .._envs import bridge_python
from .._host.builtins import BUILTIN_BRIDGES, BUILTIN_REQUIREMENTS
from .._host.extras import builtin_extra, install_hint, shipped_builtins
from .._host.registry import EnvironmentProblem, validate_environment
from ..config import BridgeConfig, MLBridgeConfig
from ..errors import ConfigError
from ._config import config_source, load_config
from ._errors import EXIT_FAILURE, EXIT_OK
from ._format import table, write_json

__all__ = ["run_doctor", "run_list"]

_CHECK_TIMEOUT = 30.0
DEFAULT_IMPORT_TIMEOUT = 120.0


def _problem_doc(p: EnvironmentProblem) -> dict[str, Any]:
    doc: dict[str, Any] = {"bridge": p.bridge, "kind": p.kind, "message": p.message, "fix": p.fix}
    if p.traceback is not None:
        doc["traceback"] = p.traceback
    return doc


def _check_all(
    bridges: list[BridgeConfig], import_timeout: float | None = None
) -> dict[str, list[EnvironmentProblem]]:
    """Problems per bridge; the probes (one subprocess per interpreter) run side by side. With
    ``import_timeout``, each bridge is also imported in its own interpreter."""
    if not bridges:
        return {}

    def check(b: BridgeConfig) -> list[EnvironmentProblem]:
        if import_timeout is None:
            return validate_environment(b, timeout=_CHECK_TIMEOUT)
        return validate_environment(
            b, timeout=_CHECK_TIMEOUT, import_bridge=True, import_timeout=import_timeout
        )

    with ThreadPoolExecutor(max_workers=min(4, len(bridges))) as ex:
        found = ex.map(check, bridges)
        return {b.name: problems for b, problems in zip(bridges, found, strict=True)}


def _unconfigured_builtins(cfg: MLBridgeConfig) -> dict[str, BridgeConfig]:
    """Built-ins that ship here but that the config does not name (nor targets)."""
    used = {b.python_module for b in cfg.bridges.values() if b.python_script is None}
    return {
        name: BridgeConfig(name=name, python_module=name)
        for name in shipped_builtins()
        if name not in cfg.bridges and name not in used
    }


def _packages(cfg: BridgeConfig) -> list[str]:
    builtin = BUILTIN_REQUIREMENTS.get(cfg.python_module or "", ())
    if cfg.python_script is not None:
        builtin = ()
    return list(dict.fromkeys((*builtin, *cfg.required_packages)))


# --------------------------------------------------------------------------- doctor


def run_doctor(ns: argparse.Namespace) -> int:
    try:
        loaded = load_config(ns.config)
    except ConfigError as exc:
        doc: dict[str, Any] = {
            "config": config_source(ns.config),
            "healthy": False,
            "bridges": {},
            "problems": [
                {
                    "bridge": None,
                    "kind": "config",
                    "key_path": e.get("key_path"),
                    "message": e.get("message"),
                    "fix": e.get("fix"),
                }
                # every error in the file (one ConfigError lists them all)
                for e in exc.details.get("errors")
                or [
                    {
                        "key_path": exc.details.get("key_path"),
                        "message": str(exc),
                        "fix": exc.details.get("fix"),
                    }
                ]
            ],
        }
        _emit_doctor(doc, ns.json)
        return EXIT_FAILURE
    cfg = loaded.config
    timeout = getattr(ns, "timeout", None) or DEFAULT_IMPORT_TIMEOUT
    found = _check_all(list(cfg.bridges.values()), import_timeout=timeout)
    limits = {name: _limits_of(b) for name, b in cfg.bridges.items()}
    for name, lim in limits.items():  # an isolation option this machine cannot honour
        if lim is not None and lim.get("refused"):
            found[name] = [*found[name], _refusal(name, lim["refused"])]
    problems = [_problem_doc(p) for ps in found.values() for p in ps]
    others = _unconfigured_builtins(cfg)
    others_found = _check_all(list(others.values()))
    doc = {
        "config": loaded.source,
        "env_overrides": list(loaded.env_overrides),
        "default_bridge": cfg.default_bridge,
        "healthy": not problems,
        "bridges": {
            name: {
                "ok": not found[name],
                "target": b.target,
                "python": bridge_python(b),
                "pool_size": b.pool_size,
                "overflow": b.overflow,
                "required_packages": _packages(b),
                "required_env": list(b.required_env),
                "problems": [_problem_doc(p) for p in found[name]],
                "limits": limits[name],
            }
            for name, b in cfg.bridges.items()
        },
        "problems": problems,
        "limits": isolation.describe_machine(),
        "other_builtins": {
            name: {
                "installed": not [p for p in others_found[name] if p.kind != "env"],
                "extra": builtin_extra(name),
                "install": install_hint(name),
            }
            for name in others
        },
    }
    _emit_doctor(doc, ns.json)
    return EXIT_OK if not problems else EXIT_FAILURE


def _emit_doctor(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        write_json(doc, indent=2)
        return
    out = sys.stdout
    print(f"config: {doc['config']}", file=out)
    if doc.get("env_overrides"):
        print(f"environment overrides: {', '.join(doc['env_overrides'])}", file=out)
    for p in doc["problems"]:
        if p["kind"] == "config":
            where = f" at {p['key_path']}" if p.get("key_path") else ""
            print(f"FAIL config{where}: {p['message']}", file=out)
    for name, info in doc["bridges"].items():
        mark = "ok  " if info["ok"] else "FAIL"
        print(f"{mark} {name}: {info['target']} under {info['python']}", file=out)
        for p in info["problems"]:
            print(f"       {p['kind']}: {p['message']}", file=out)
            if p.get("traceback"):
                print("       traceback (last lines):", file=out)
                for line in p["traceback"].splitlines():
                    print(f"         {line}", file=out)
            print(f"       fix: {p['fix']}", file=out)
        _print_limits(info.get("limits"), out)
    for name, info in doc.get("other_builtins", {}).items():
        state = "installed" if info["installed"] else f"not installed: {info['install']}"
        print(f"     {name}: built-in, not configured ({state})", file=out)
    if doc.get("limits"):
        _print_machine(doc["limits"], out)
    n = len(doc["problems"])
    print("healthy" if n == 0 else f"{n} problem{'s' if n > 1 else ''} found", file=out)


# --------------------------------------------------------------------------- limits (issue 16)


def _limits_of(b: BridgeConfig) -> dict[str, Any] | None:
    return isolation.summarize(isolation.request_of(b.options, b.target, list(b.env)))


def _refusal(name: str, why: str) -> EnvironmentProblem:
    return EnvironmentProblem(
        name,
        "isolation",
        why,
        "run the host where it may unshare a network namespace (root, or unprivileged user "
        "namespaces enabled), or set network = true for this bridge",
    )


def _print_limits(lim: dict[str, Any] | None, out: Any) -> None:
    if not lim:
        return
    for key, how in lim["mechanisms"].items():
        print(f"       limit {key}: {how}", file=out)
    for key, why in lim["not_applied"].items():
        print(f"       NOT APPLIED {key}: {why}", file=out)


def _print_machine(m: dict[str, Any], out: Any) -> None:
    print(f"limits on this machine (cgroup: {m['cgroup']}):", file=out)
    for key, how in m["mechanisms"].items():
        weak = m["limited"].get(key)
        print(f"  {key}: {how}" + (f" (limited: {weak})" if weak else ""), file=out)


# --------------------------------------------------------------------------- list


def run_list(ns: argparse.Namespace) -> int:
    loaded = load_config(ns.config)
    cfg: MLBridgeConfig = loaded.config
    # Built-ins the config does not name, and that ship here: listed so people see what they
    # could enable (never one this mlbridge does not have).
    bridges = {**cfg.bridges, **_unconfigured_builtins(cfg)}
    found = _check_all(list(bridges.values()))
    rows: list[dict[str, Any]] = []
    for name, b in bridges.items():
        missing = [p for p in found[name] if p.kind != "env"]
        env_missing = [p for p in found[name] if p.kind == "env"]
        builtin = (b.python_module or "") in BUILTIN_BRIDGES and b.python_script is None
        rows.append(
            {
                "name": name,
                "configured": name in cfg.bridges,
                "default": name == cfg.default_bridge,
                "builtin": builtin,
                "extra": builtin_extra(b.python_module or "") if builtin else None,
                "install": install_hint(b.python_module or "", b.python)
                if builtin and missing
                else None,
                "target": b.target,
                "python": bridge_python(b),
                "packages": _packages(b),
                "installed": not missing,
                "env_ok": not env_missing,
                "problems": [_problem_doc(p) for p in found[name]],
            }
        )
    if ns.json:
        write_json({"config": loaded.source, "bridges": rows}, indent=2)
        return EXIT_OK
    print(f"config: {loaded.source}")
    print(
        table(
            ["BRIDGE", "CONFIGURED", "INSTALLED", "TARGET", "PACKAGES"],
            [
                [
                    r["name"] + (" (default)" if r["default"] else ""),
                    "yes" if r["configured"] else "no",
                    ("yes" if r["installed"] else "no")
                    + ("" if r["env_ok"] else ", env missing")
                    + (f" ({r['install']})" if r["install"] else ""),
                    r["target"],
                    ", ".join(r["packages"]) or "-",
                ]
                for r in rows
            ],
        )
    )
    return EXIT_OK
