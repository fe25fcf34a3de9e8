"""``mlbridge call`` and ``mlbridge status``: the running host when there is one, else a
throw-away host per command.

A running host (``--url``, ``$MLBRIDGE_URL``, or the run-time file ``mlbridge serve`` writes:
see :mod:`._remote`) is used through its HTTP gateway, so ``status`` shows that host's real
pools and request counts and ``call`` reuses its warm workers. Without one, the command says so
on stderr and starts its own host (``AsyncMLBridge`` on a fresh event loop), does its work and
closes it, which stops every worker it started. Bridges such a command does not need stay lazy,
so ``call echo ...`` never waits for a slow framework pool that the config marks eager.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .._api import AsyncMLBridge
from ..config import MLBridgeConfig
from ..errors import FrameworkNotFoundError, MLBridgeError
from ._config import load_config
from ._errors import EXIT_FAILURE, EXIT_OK, UsageError
from ._format import render_status, write_json
from ._progress import ProgressBar
from ._remote import RemoteHost, find_running_host, throwaway_notice

__all__ = ["parse_json_args", "run_call", "run_restart", "run_status"]


def parse_json_args(text: str | None) -> dict[str, Any]:
    """The ``json-args`` of ``call``: a JSON object (``-`` reads it from stdin)."""
    if text is None or text == "":
        return {}
    source = "stdin" if text == "-" else "json-args"
    if text == "-":
        text = sys.stdin.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
            f"{_clip(text)!r}. Fix: pass one JSON object in single quotes, e.g. "
            "mlbridge call echo echo '{\"x\": 1}'"
        ) from None
    if not isinstance(value, dict):
        raise UsageError(
            f"{source} must be a JSON object (the command's named arguments), not "
            f"{type(value).__name__} {_clip(text)!r}. Fix: wrap it, e.g. '{{\"value\": {text}}}'"
        )
    return value


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_lazy(cfg: MLBridgeConfig) -> MLBridgeConfig:
    """``cfg`` with every bridge lazy: a command starts the pools it needs itself, so a pool it
    does not need is never waited for, and one failing pool cannot fail the host's start."""
    out = cfg
    for name, bridge in cfg.bridges.items():
        if not bridge.options.lazy:
            out = out.replace_bridge(name, lazy=True)
    return out


def _require_bridge(cfg: MLBridgeConfig, name: str, source: str) -> None:
    if name not in cfg.bridges:
        known = ", ".join(cfg.bridges) or "none"
        raise FrameworkNotFoundError(
            f"no bridge named {name!r} in the config ({source}; configured: {known}). "
            "Fix: use one of those names, add a [bridges."
            f"{name}] table to mlbridge.toml, or pass --config PATH",
            bridge=name,
        )


# --------------------------------------------------------------------------- call


def _progress_bar() -> ProgressBar | None:
    """A bar on stderr for a model load's progress chunks, when stderr is a terminal (the
    chunks themselves still go to stdout as JSON lines)."""
    return ProgressBar(sys.stderr) if sys.stderr.isatty() else None


def _show_progress(bar: ProgressBar | None, chunk: Any) -> None:
    if bar is None or not isinstance(chunk, dict):
        return
    if isinstance(chunk.get("progress"), dict):
        bar.update(chunk["progress"])
    else:
        bar.finish()


def run_call(ns: argparse.Namespace) -> int:
    args = parse_json_args(ns.json_args)
    if ns.timeout is not None and ns.timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {ns.timeout:g}")
    if getattr(ns, "msgpack", False):
        if ns.stream:
            raise UsageError(
                "--msgpack writes one value, not a stream. Fix: drop --stream, or drop "
                "--msgpack for one JSON line per chunk"
            )
        if sys.stdout.isatty():
            raise UsageError(
                "--msgpack writes binary MessagePack, not for a terminal. Fix: redirect it, "
                "e.g. mlbridge call ... --msgpack > result.msgpack"
            )
    remote = find_running_host(getattr(ns, "url", None))
    if remote is not None:
        return _remote_call(remote, ns, args)
    loaded = load_config(ns.config)
    _require_bridge(loaded.config, ns.bridge, loaded.source)
    cfg = _all_lazy(loaded.config)
    throwaway_notice("call")
    return asyncio.run(_call(cfg, ns, args))


def _remote_call(remote: RemoteHost, ns: argparse.Namespace, args: dict[str, Any]) -> int:
    if ns.stream:
        bar = _progress_bar()
        for kind, value in remote.stream(ns.bridge, ns.command, args, ns.timeout):
            if kind == "chunk":
                _show_progress(bar, value)
            if kind == "chunk" or ns.final:
                write_json(value)
        if bar is not None:
            bar.finish()
    elif getattr(ns, "msgpack", False):
        _write_binary(remote.execute_msgpack(ns.bridge, ns.command, args, ns.timeout))
    else:
        result = remote.execute(ns.bridge, ns.command, args, ns.timeout)
        write_json(result, indent=2 if sys.stdout.isatty() else None)
    return EXIT_OK


def _write_binary(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


async def _call(cfg: MLBridgeConfig, ns: argparse.Namespace, args: dict[str, Any]) -> int:
    bridge = AsyncMLBridge(cfg, env_overrides=False)
    try:
        await bridge.start()
        if ns.stream:
            stream = bridge.stream(ns.bridge, ns.command, args, timeout=ns.timeout)
            bar = _progress_bar()
            async for chunk in stream:
                _show_progress(bar, chunk)
                write_json(chunk)
            if bar is not None:
                bar.finish()
            if ns.final:
                write_json(stream.result)
        else:
            result = await bridge.execute(ns.bridge, ns.command, args, timeout=ns.timeout)
            if getattr(ns, "msgpack", False):
                from .._protocol.codec import plain_msgpack

                _write_binary(plain_msgpack(result))
            else:
                write_json(result, indent=2 if sys.stdout.isatty() else None)
    finally:
        await bridge.close()
    return EXIT_OK


# --------------------------------------------------------------------------- status


def run_status(ns: argparse.Namespace) -> int:
    remote = find_running_host(getattr(ns, "url", None))
    if remote is not None:
        return _remote_status(remote, ns)
    loaded = load_config(ns.config)
    names = list(loaded.config.bridges)
    if ns.bridge is not None:
        _require_bridge(loaded.config, ns.bridge, loaded.source)
        names = [ns.bridge]
    cfg = _all_lazy(loaded.config)

    def show(doc: dict[str, Any], problems: dict[str, str]) -> None:
        doc["config"] = loaded.source
        doc["host"] = {"kind": "throw-away"}
        if ns.json:
            write_json(doc, indent=2)
        else:
            print(f"config: {loaded.source}")
            print(
                "host: throw-away (started for this command, stopped when it ends: its "
                "counts are only this command's; run `mlbridge serve` to keep a host)"
            )
            print(render_status(doc, problems))

    throwaway_notice("status")
    healthy = asyncio.run(_status(cfg, names, ns.wait_timeout, show))
    return EXIT_OK if healthy else EXIT_FAILURE


async def _status(
    cfg: MLBridgeConfig,
    names: list[str],
    wait_timeout: float,
    show: Callable[[dict[str, Any], dict[str, str]], None],
) -> bool:
    """Start the pools, run one heartbeat round, ``show`` the snapshot while the workers are
    still running, then close. True when every pool is ready."""
    bridge = AsyncMLBridge(cfg, env_overrides=False)
    problems: dict[str, str] = {}
    try:
        await bridge.start()
        host = bridge._host

        async def start(name: str) -> None:
            try:
                await asyncio.wait_for(host.pool(name).ensure_started(), wait_timeout)
            except TimeoutError:
                problems[name] = (
                    f"not ready within {wait_timeout:g}s (raise --wait-timeout, or see "
                    "`mlbridge doctor`)"
                )
            except MLBridgeError as exc:
                problems[name] = str(exc)

        await asyncio.gather(*(start(n) for n in names))
        # One heartbeat round: fills in each worker's RSS and proves the control path answers.
        ready = [host.pools[n] for n in names if n in host.pools and n not in problems]
        await host.health_check([p.name for p in ready])
        for pool in ready:
            if pool.state != "ready":
                problems.setdefault(pool.name, f"pool is {pool.state}")
        stats = bridge.statistics().to_dict()
        stats["pools"] = {n: stats["pools"][n] for n in names}
        stats["host_pid"] = os.getpid()
        stats["problems"] = problems
        stats["healthy"] = not problems
        show(stats, problems)
        return not problems
    finally:
        await bridge.close()


def _remote_status(remote: RemoteHost, ns: argparse.Namespace) -> int:
    """The running host's own statistics (nothing is started: lazy pools stay idle)."""
    stats = remote.statistics()
    pools: dict[str, Any] = stats.get("pools", {})
    if ns.bridge is not None:
        if ns.bridge not in pools:
            known = ", ".join(pools) or "none"
            raise FrameworkNotFoundError(
                f"the running host at {remote.url} has no bridge named {ns.bridge!r} "
                f"(it has: {known}). Fix: use one of those names",
                bridge=ns.bridge,
            )
        pools = {ns.bridge: pools[ns.bridge]}
    problems = {
        name: str(pool.get("boot_error") or "the bridge is broken")
        for name, pool in pools.items()
        if pool.get("state") == "broken"
    }
    doc = {
        **stats,
        "pools": pools,
        "problems": problems,
        "healthy": not problems,
        "host": {"kind": "running", "url": remote.url, "found_through": remote.source},
    }
    if remote.pid is not None:
        doc["host_pid"] = remote.pid
    if ns.json:
        write_json(doc, indent=2)
    else:
        print(f"host: running at {remote.url} (found through {remote.source})")
        print(render_status(doc, problems))
    return EXIT_OK if not problems else EXIT_FAILURE


def run_restart(ns: argparse.Namespace) -> int:
    """``mlbridge restart BRIDGE``: a new pool for the bridge in the running host (the CLI's
    ``update_config``): for a bridge broken at boot once its cause is fixed."""
    remote = find_running_host(getattr(ns, "url", None))
    if remote is None:
        raise UsageError(
            f"no running host to restart {ns.bridge!r} in (none at --url, $MLBRIDGE_URL or in "
            "the run-time file of `mlbridge serve`). Fix: nothing to do without one: each "
            "`mlbridge call` / `mlbridge status` starts its pools afresh; to restart a bridge "
            "of a served host, pass its address with --url"
        )
    reply = remote.restart(ns.bridge, ns.timeout)
    if ns.json:
        write_json(reply, indent=2)
    else:
        print(f"{ns.bridge}: restarted in the host at {remote.url} (pool {reply.get('state')})")
    return EXIT_OK
