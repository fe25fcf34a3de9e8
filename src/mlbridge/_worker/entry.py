"""``python -m mlbridge.worker <bridge>``: protect stdout, apply limits, load the bridge, serve.

The order matters. Before any framework is imported the real stdout is kept for frames and fd 1
(and ``sys.stdout``) point at stderr, so a stray ``print`` or a C library writing to fd 1 cannot
corrupt the stream; stdin is likewise kept for frames and fd 0 reads /dev/null. Limits and thread
caps are applied next, then the bridge is imported and its framework initialised. A failure there
prints one ``MLBRIDGE-BOOT-ERROR {json}`` line on stderr and exits with a named boot code, so the
host can mark the bridge broken instead of restarting it forever.

A bridge script written to the original design serves itself the same way: its
``MyBridge().run()`` (:func:`run_instance`) parses ``--mode`` / ``--worker-id`` and the options
below from ``sys.argv``, then follows the same order from the stdio step on (the script's own
module-level imports have run by then; ``_initialize_framework`` has not).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .._builtin_bridges import BUILTIN_BRIDGES
from .._protocol.exit_codes import (
    BOOT_ERROR_MARKER,
    EXIT_BRIDGE_LOAD_FAILED,
    EXIT_FRAMEWORK_INIT_FAILED,
    EXIT_INTERNAL,
    EXIT_USAGE,
)
from .._protocol.framing import DEFAULT_MAX_FRAME_BYTES
from .._protocol.wire_errors import classify_exception

__all__ = ["BUILTIN_BRIDGES", "load_bridge_class", "main", "run_instance"]


class BridgeLoadError(Exception):
    pass


#: Bridge classes a fork-server template imported before forking (``start = "fork"``): a forked
#: worker takes its class from here instead of loading the bridge again.
PRELOADED: dict[str, type[Any]] = {}


def _parser(
    prog: str = "python -m mlbridge.worker", *, script: bool = False
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    if not script:
        p.add_argument("bridge", help="built-in name, package.module:Class, or path/to/bridge.py")
    # A script keeps the mode its bridge was built with unless --mode is given.
    p.add_argument(
        "--mode", choices=["standalone", "pool-worker"], default=None if script else "standalone"
    )
    p.add_argument("--worker-id", default=None)
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES)
    p.add_argument("--settings-json", default=None, help="framework settings as a JSON object")
    p.add_argument("--limits-json", default=None, help='rlimits, e.g. {"address_space_bytes": N}')
    p.add_argument("--threads", type=int, default=None, help="cap BLAS/OpenMP threads")
    p.add_argument("--parent-pid", type=int, default=None, help="die when this process dies")
    return p


def _protect_stdio() -> tuple[int, int]:
    """Keep the real stdin/stdout for frames; make fds 0/1 harmless for everything else."""
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull)
    return in_fd, out_fd


def _boot_failure(code: int, exc: BaseException, what: str) -> int:
    info = {
        "error": f"{what}: {exc}",
        "error_type": type(exc).__name__,
        "error_code": classify_exception(exc)
        if not isinstance(exc, BridgeLoadError)
        else "invalid_configuration",
        "traceback": "".join(traceback.format_exception(exc)),
    }
    sys.stderr.write(info["traceback"])
    sys.stderr.write(BOOT_ERROR_MARKER + json.dumps(info) + "\n")
    sys.stderr.flush()
    return code


def load_bridge_class(spec: str) -> type[Any]:
    """Resolve a built-in name, ``module:Class``, ``module``, or ``file.py[:Class]``."""
    from ..bridges.base import BaseBridge

    target = BUILTIN_BRIDGES.get(spec, spec)
    module_part, _, class_name = target.partition(":")
    if module_part.endswith(".py") or os.sep in module_part:
        path = Path(module_part).expanduser()
        if not path.is_file():
            raise BridgeLoadError(f"bridge script {str(path)!r} does not exist")
        mod_name = f"mlbridge_user_bridge_{path.stem}"
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        if mspec is None or mspec.loader is None:
            raise BridgeLoadError(f"cannot load {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = module
        sys.path.insert(0, str(path.parent.resolve()))
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            if spec in BUILTIN_BRIDGES and exc.name and not exc.name.startswith("mlbridge"):
                raise
            if exc.name == module_part or (exc.name and module_part.startswith(exc.name)):
                known = ", ".join(sorted(BUILTIN_BRIDGES))
                raise BridgeLoadError(
                    f"no bridge named {spec!r}: not a built-in ({known}), and module "
                    f"{module_part!r} is not importable by {sys.executable}"
                ) from exc
            raise
    if class_name:
        cls = getattr(module, class_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, BaseBridge)):
            raise BridgeLoadError(f"{target!r}: {class_name!r} is not a BaseBridge subclass")
        return cls
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseBridge)
        and obj is not BaseBridge
        and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        names = ", ".join(c.__name__ for c in found) or "none"
        raise BridgeLoadError(
            f"{target!r} must define exactly one BaseBridge subclass (found: {names}); "
            "name one with 'module:Class' or 'file.py:Class'"
        )
    return found[0]


def _make_bridge(cls: type[Any], mode: str, worker_id: str | None, settings: dict[str, Any]) -> Any:
    """Build the bridge, passing what its constructor takes (one written to the original
    design takes ``mode`` and ``worker_id`` only); the rest is set on the instance after."""
    wanted: dict[str, Any] = {"mode": mode, "worker_id": worker_id, "settings": settings}
    try:
        params = dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        params = {}
    if not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = wanted
    else:
        kwargs = {k: v for k, v in wanted.items() if k in params}
    bridge = cls(**kwargs)
    if "mode" not in kwargs:
        bridge.mode = mode
    if "worker_id" not in kwargs and worker_id is not None:
        bridge.worker_id = worker_id
    if "settings" not in kwargs:
        bridge.settings = dict(settings)
    return bridge


def _prepare(args: argparse.Namespace) -> tuple[dict[str, Any] | None, int]:
    """Settings, parent watch, limits and thread caps: ``(settings, 0)`` or ``(None, exit)``."""
    try:
        settings = json.loads(
            args.settings_json or os.environ.get("MLBRIDGE_WORKER_SETTINGS") or "{}"
        )
        limits = json.loads(args.limits_json or "{}")
        if not isinstance(settings, dict) or not isinstance(limits, dict):
            raise ValueError("--settings-json and --limits-json must be JSON objects")
    except ValueError as exc:
        return None, _boot_failure(EXIT_USAGE, exc, "bad worker arguments")

    from .isolate import apply as apply_isolation
    from .limits import apply_limits, die_with_parent, set_threads

    try:  # cgroups, namespaces, rlimits, private directory, user (issue 16): before the bridge
        apply_isolation()
    except (ValueError, OSError) as exc:
        return None, _boot_failure(EXIT_USAGE, exc, "cannot apply the bridge's isolation")
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    try:
        if args.threads:
            set_threads(args.threads)
        apply_limits({k: int(v) for k, v in limits.items()})
    except (ValueError, OSError) as exc:
        return None, _boot_failure(EXIT_USAGE, exc, "cannot apply worker limits")
    return settings, 0


def _setup_and_serve(bridge: Any, what: str, in_fd: int, out_fd: int, max_frame_bytes: int) -> int:
    try:
        bridge.setup()
    except BaseException as exc:
        return _boot_failure(EXIT_FRAMEWORK_INIT_FAILED, exc, f"bridge {what} failed to initialise")
    from .isolate import drop_privileges
    from .serve import Server
    from .transport import Transport

    try:
        drop_privileges()  # a sandboxed worker leaves root behind once it has loaded its code
    except OSError as exc:
        return _boot_failure(EXIT_USAGE, exc, "cannot drop privileges")

    try:
        server = Server(bridge, Transport(in_fd, out_fd, max_frame_bytes))
        return server.serve_forever()
    except BaseException as exc:
        traceback.print_exc()
        sys.stderr.write(f"mlbridge worker: internal error: {exc!r}\n")
        return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> int:
    in_fd, out_fd = _protect_stdio()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else 0
    settings, code = _prepare(args)
    if settings is None:
        return code
    try:
        cls = PRELOADED.get(args.bridge) or load_bridge_class(args.bridge)
        bridge = _make_bridge(cls, args.mode, args.worker_id, settings)
    except BaseException as exc:
        return _boot_failure(EXIT_BRIDGE_LOAD_FAILED, exc, f"cannot load bridge {args.bridge!r}")
    return _setup_and_serve(bridge, repr(args.bridge), in_fd, out_fd, args.max_frame_bytes)


def serve_instance(bridge: Any, argv: list[str]) -> int:
    """Serve an already built bridge (``BaseBridge.run``): the worker's start-up from stdio on."""
    in_fd, out_fd = _protect_stdio()
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else type(bridge).__name__
    try:
        args = _parser(prog, script=True).parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else 0
    settings, code = _prepare(args)
    if settings is None:
        return code
    if args.mode is not None:
        bridge.mode = args.mode
    if args.worker_id is not None:
        bridge.worker_id = args.worker_id
    if settings:
        bridge.settings.update(settings)
    return _setup_and_serve(bridge, type(bridge).__name__, in_fd, out_fd, args.max_frame_bytes)


def run_instance(bridge: Any, argv: list[str]) -> None:
    """:func:`serve_instance`, then end the process with its exit code (never returns)."""
    code = serve_instance(bridge, argv)
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    code = main()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: frameworks' atexit hooks can hang a dying worker
