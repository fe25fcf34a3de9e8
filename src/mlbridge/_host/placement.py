"""Where a bridge's workers run: backend options from the config, and each worker's location.

:func:`backend_options` turns ``[bridges.x.ray]`` (and the bridge's own environment, where a
Ray ``runtime_env`` is how the nodes get it) into the :class:`~mlbridge._backends.WorkerSpec`'s
``backend_options``; :func:`configure_backend` hands the ``[ray]`` table to the ray backend
before its first worker; :func:`worker_location` is what statistics and ``mlbridge status`` show.
"""

from __future__ import annotations

import socket
from typing import Any

from ..config import BridgeConfig, MLBridgeConfig
from .channel import WorkerChannel

__all__ = ["backend_options", "configure_backend", "worker_location"]

_HOSTNAME = socket.gethostname()


def backend_options(cfg: BridgeConfig) -> dict[str, Any]:
    """The ray backend's per-actor options for ``cfg`` (empty for the other backends)."""
    if cfg.options.backend != "ray":
        return {}
    out: dict[str, Any] = {"num_cpus": 1.0, "num_gpus": 0.0}
    runtime_env: dict[str, Any] = {}
    if cfg.ray is not None:
        out.update(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus)
        if cfg.ray.resources:
            out["resources"] = dict(cfg.ray.resources)
        runtime_env = dict(cfg.ray.runtime_env)
    if runtime_env:
        out["runtime_env"] = runtime_env
    if cfg.environment is not None:  # for nodes that do not share this machine's cache
        out["environment_packages"] = list(cfg.environment.packages)
    return out


def configure_backend(cfg: BridgeConfig, config: MLBridgeConfig) -> None:
    """Before a pool of ``cfg`` starts: give its backend the host-wide settings it needs."""
    if cfg.options.backend == "ray":
        from .._backends import ray as ray_backend

        ray_backend.configure(config.ray.address, config.ray.num_cpus, config.ray.namespace)


def worker_location(channel: WorkerChannel) -> tuple[str | None, int | None]:
    """(node, pid) of a worker: this machine for local backends, the Ray node for ray."""
    transport = channel.transport
    node = getattr(transport, "node", None)
    pid = getattr(transport, "pid", None)
    if node is None and transport is not None and getattr(transport, "actor", None) is None:
        node = _HOSTNAME
    return node, pid
