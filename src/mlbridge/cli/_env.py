"""``mlbridge env build|list|prune``: the per-bridge environments of :mod:`mlbridge._envs`.

::

    mlbridge env build [BRIDGE ...] [--rebuild] [--json] [--config PATH]
    mlbridge env list  [--json] [--config PATH]
    mlbridge env prune [--all] [--json] [--config PATH]

``build`` builds (or finds cached) the environment of every configured bridge that declares one
(or of the named bridges), with a progress bar on stderr; ``list`` shows the cache, marking the
environments the current config uses; ``prune`` removes the cached environments the current
config does not use (``--all``: every one) and leftovers of interrupted builds.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .._envs import BuildProgress, build, envs_dir, list_environments, prune, resolve
from ..config import BridgeConfig, MLBridgeConfig
from ..errors import ConfigError, FrameworkNotFoundError
from ._config import load_config
from ._errors import EXIT_OK
from ._format import format_bytes, table, write_json

__all__ = ["add_env_parser", "run_env"]


def add_env_parser(sub: Any, add_config: Any) -> None:
    """Register ``env`` and its three subcommands on the CLI's subparsers."""
    p = sub.add_parser("env", help="build, list and prune per-bridge environments (uv)")
    esub = p.add_subparsers(dest="env_cmd", metavar="ACTION", required=True)
    b = esub.add_parser("build", help="build the environments the config declares")
    b.add_argument("bridges", nargs="*", metavar="BRIDGE", help="only these bridges")
    b.add_argument("--rebuild", action="store_true", help="rebuild even when cached")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    add_config(b)
    ls = esub.add_parser("list", help="the cached environments")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    add_config(ls)
    pr = esub.add_parser("prune", help="remove cached environments the config does not use")
    pr.add_argument("--all", action="store_true", help="remove every cached environment")
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    add_config(pr)


def _with_env(config: MLBridgeConfig, names: list[str]) -> list[BridgeConfig]:
    for name in names:
        if name not in config.bridges:
            raise FrameworkNotFoundError(
                f"no bridge named {name!r} is configured (configured: "
                f"{', '.join(config.bridges) or 'none'}). Fix: use a configured name"
            )
    chosen = [config.bridges[n] for n in names] if names else list(config.bridges.values())
    without = [b.name for b in chosen if b.environment is None]
    if names and without:
        raise ConfigError(
            f"bridge(s) {', '.join(without)} declare no environment. Fix: add "
            f'[bridges.{without[0]}.environment] packages = ["..."] to the config'
        )
    return [b for b in chosen if b.environment is not None]


class _Bar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = ""

    def __call__(self, p: BuildProgress) -> None:
        width = 20
        filled = width * p.step // p.total
        bar = "#" * filled + "-" * (width - filled)
        line = f"{p.bridge or p.key} [{bar}] {p.step}/{p.total} {p.message}"
        if self._tty:
            sys.stderr.write("\r\x1b[2K" + line[:120])
        elif line != self._last:
            sys.stderr.write(line + "\n")
        self._last = line
        sys.stderr.flush()

    def done(self) -> None:
        if self._tty and self._last:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _run_build(ns: argparse.Namespace) -> int:
    config = load_config(ns.config).config
    bridges = _with_env(config, list(ns.bridges))
    rows: list[dict[str, Any]] = []
    for cfg in bridges:
        assert cfg.environment is not None
        bar = _Bar()
        started = time.monotonic()
        try:
            result = build(cfg.environment, bridge=cfg.name, progress=bar, rebuild=ns.rebuild)
        finally:
            bar.done()
        rows.append(
            {
                "bridge": cfg.name,
                "key": result.env.key,
                "path": str(result.env.path),
                "python": result.env.python,
                "packages": list(cfg.environment.packages),
                "built": result.built,
                "seconds": round(time.monotonic() - started, 3),
            }
        )
    if ns.json:
        write_json({"environments": rows, "cache": str(envs_dir())})
    elif not rows:
        print("no configured bridge declares an environment ([bridges.NAME.environment])")
    else:
        print(
            table(
                ["BRIDGE", "ENV", "STATE", "TIME", "PACKAGES"],
                [
                    [
                        r["bridge"],
                        r["key"],
                        "built" if r["built"] else "cached",
                        f"{r['seconds']:.1f}s",
                        " ".join(r["packages"]),
                    ]
                    for r in rows
                ],
            )
        )
    return EXIT_OK


def _used(config: MLBridgeConfig) -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for b in config.bridges.values():
        if b.environment is not None:
            used.setdefault(resolve(b.environment).key, []).append(b.name)
    return used


def _run_list(ns: argparse.Namespace) -> int:
    used = _used(load_config(ns.config).config)
    envs = list_environments()
    for e in envs:
        e["bridges"] = used.get(e["key"], [])
    if ns.json:
        write_json({"environments": envs, "cache": str(envs_dir())})
        return EXIT_OK
    if not envs:
        print(f"no environments cached in {envs_dir()}")
        return EXIT_OK
    print(
        table(
            ["ENV", "BRIDGES", "SIZE", "PACKAGES"],
            [
                [
                    e["key"],
                    ",".join(e["bridges"]) or "-",
                    format_bytes(e["size_bytes"]),
                    " ".join(e["packages"]),
                ]
                for e in envs
            ],
        )
    )
    return EXIT_OK


def _run_prune(ns: argparse.Namespace) -> int:
    keep = () if ns.all else tuple(_used(load_config(ns.config).config))
    removed = prune(keep)
    if ns.json:
        write_json({"removed": removed, "kept": list(keep), "cache": str(envs_dir())})
        return EXIT_OK
    freed = sum(r["size_bytes"] for r in removed)
    print(f"removed {len(removed)} environment folder(s), {format_bytes(freed)} freed")
    return EXIT_OK


def run_env(ns: argparse.Namespace) -> int:
    if ns.env_cmd == "build":
        return _run_build(ns)
    if ns.env_cmd == "list":
        return _run_list(ns)
    return _run_prune(ns)
