"""Configuration for scaling out: a bridge's own environment, its Ray placement, the Ray cluster.

Three tables, each validated here and used by :mod:`mlbridge.config`::

    [bridges.six_old.environment]       # EnvironmentSpec: a uv-built virtual environment
    packages = ["six==1.16.0"]
    python = "3.11"                     # optional: uv's --python (default: the host's interpreter)
    index_url = "https://pypi.org/simple"   # optional (default: the index pip uses here)
    constraints = ["idna<4"]            # optional: uv's --constraint lines

    [bridges.echo.ray]                  # RayOptions: per-actor resources (backend = "ray")
    num_cpus = 1
    num_gpus = 0
    resources = {custom = 1}
    runtime_env = {env_vars = {A = "1"}}

    [ray]                               # RayConfig: which cluster
    address = "auto"                    # or "ray://head:10001"; unset: a local cluster on demand

Nothing here imports the host or Ray.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from ._config_values import Ctx, _json_value, as_str, type_error, unknown_key

__all__ = [
    "ENVIRONMENT_KEYS",
    "RAY_OPTION_KEYS",
    "RAY_TOP_KEYS",
    "EnvironmentSpec",
    "RayConfig",
    "RayOptions",
    "as_environment",
    "as_ray_config",
    "as_ray_options",
    "environment_to_mapping",
    "ray_config_to_mapping",
    "ray_options_to_mapping",
]

ENVIRONMENT_KEYS: Final = ("packages", "python", "index_url", "constraints")
RAY_OPTION_KEYS: Final = ("num_cpus", "num_gpus", "resources", "runtime_env")
RAY_TOP_KEYS: Final = ("address", "num_cpus", "namespace")

# A PEP 508 requirement, loosely: a name, optional extras, then anything (versions, markers, URLs).
_REQUIREMENT_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\s*(\[[^\]]*\])?.*")


@dataclass(frozen=True, slots=True)
class EnvironmentSpec:
    """A bridge's own virtual environment, built with uv (see :mod:`mlbridge._envs`)."""

    packages: tuple[str, ...] = ()
    python: str | None = None
    index_url: str | None = None
    constraints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RayOptions:
    """What each Ray actor of a bridge asks the cluster for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    runtime_env: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (MappingProxyType is not)
        return _ray_options, (
            self.num_cpus,
            self.num_gpus,
            dict(self.resources),
            _json_value(Ctx(), "ray.runtime_env", self.runtime_env),
        )


def _ray_options(
    num_cpus: float, num_gpus: float, resources: dict[str, float], runtime_env: dict[str, Any]
) -> RayOptions:
    return RayOptions(
        num_cpus, num_gpus, MappingProxyType(resources), MappingProxyType(runtime_env)
    )


@dataclass(frozen=True, slots=True)
class RayConfig:
    """Which Ray cluster the ``ray`` backend uses: ``address`` unset starts a local one."""

    address: str | None = None
    num_cpus: int | None = None  # for a local cluster started on demand
    namespace: str = "mlbridge"


def _requirements(ctx: Ctx, path: str, v: Any, example: str) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, list | tuple):
        raise type_error(ctx, path, "a list of requirements", f'write ["{example}"]', v)
    for i, item in enumerate(v):
        if not isinstance(item, str) or not _REQUIREMENT_RE.fullmatch(item.strip()):
            raise ctx.error(
                f"{path}[{i}]",
                "is not a requirement",
                f'write a requirement such as "{example}" (name, then an optional version)',
                item,
            )
    return tuple(item.strip() for item in v)


def as_environment(ctx: Ctx, path: str, v: Any) -> EnvironmentSpec | None:
    """``[bridges.x.environment]`` -> :class:`EnvironmentSpec` (None stays None)."""
    if v is None or isinstance(v, EnvironmentSpec):
        return v
    if not isinstance(v, Mapping):
        raise type_error(ctx, path, "a table", 'write packages = ["six==1.17.0"]', v)
    for key in v:
        if key not in ENVIRONMENT_KEYS:
            raise unknown_key(ctx, path, key, ENVIRONMENT_KEYS)
    packages = _requirements(ctx, f"{path}.packages", v.get("packages", []), "six==1.17.0")
    if not packages:
        raise ctx.error(
            f"{path}.packages",
            "is empty, so the environment would hold nothing of the bridge's own",
            'list what the bridge needs, e.g. packages = ["six==1.17.0"], or remove the table',
            [],
        )
    python = v.get("python")
    if python is not None:
        python = as_str(ctx, f"{path}.python", python, '"3.11"')
    index_url = v.get("index_url")
    if index_url is not None:
        index_url = as_str(ctx, f"{path}.index_url", index_url, '"https://pypi.org/simple"')
        if not re.match(r"(https?|file)://", index_url):
            raise ctx.error(
                f"{path}.index_url",
                "is not an http(s):// or file:// URL",
                'write the index\'s simple API URL, e.g. "https://pypi.org/simple"',
                index_url,
            )
    constraints = _requirements(ctx, f"{path}.constraints", v.get("constraints", []), "idna<4")
    return EnvironmentSpec(packages, python, index_url, constraints)


def environment_to_mapping(spec: EnvironmentSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"packages": list(spec.packages)}
    if spec.python is not None:
        out["python"] = spec.python
    if spec.index_url is not None:
        out["index_url"] = spec.index_url
    if spec.constraints:
        out["constraints"] = list(spec.constraints)
    return out


def _number(ctx: Ctx, path: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ctx.error(path, "must be a number of 0 or more", "write e.g. 1 or 0.5", v)
    return float(v)


def as_ray_options(ctx: Ctx, path: str, v: Any) -> RayOptions | None:
    """``[bridges.x.ray]`` -> :class:`RayOptions` (None stays None)."""
    if v is None or isinstance(v, RayOptions):
        return v
    if not isinstance(v, Mapping):
        raise type_error(ctx, path, "a table", "write num_cpus = 1", v)
    for key in v:
        if key not in RAY_OPTION_KEYS:
            raise unknown_key(ctx, path, key, RAY_OPTION_KEYS)
    resources = v.get("resources", {})
    if not isinstance(resources, Mapping):
        raise type_error(ctx, f"{path}.resources", "a table", "write {custom = 1}", resources)
    res = {str(k): _number(ctx, f"{path}.resources.{k}", n) for k, n in resources.items()}
    runtime_env = v.get("runtime_env", {})
    if not isinstance(runtime_env, Mapping):
        raise type_error(
            ctx, f"{path}.runtime_env", "a table", 'write {env_vars = {A = "1"}}', runtime_env
        )
    return RayOptions(
        num_cpus=_number(ctx, f"{path}.num_cpus", v.get("num_cpus", 1)),
        num_gpus=_number(ctx, f"{path}.num_gpus", v.get("num_gpus", 0)),
        resources=MappingProxyType(res),
        runtime_env=MappingProxyType(_json_value(ctx, f"{path}.runtime_env", runtime_env)),
    )


def ray_options_to_mapping(opts: RayOptions) -> dict[str, Any]:
    return {
        "num_cpus": opts.num_cpus,
        "num_gpus": opts.num_gpus,
        "resources": dict(opts.resources),
        "runtime_env": _json_value(Ctx(), "ray.runtime_env", opts.runtime_env),
    }


def as_ray_config(ctx: Ctx, path: str, v: Any) -> RayConfig:
    """The top-level ``[ray]`` table -> :class:`RayConfig`."""
    if v is None:
        return RayConfig()
    if isinstance(v, RayConfig):
        return v
    if not isinstance(v, Mapping):
        raise type_error(ctx, path, "a table", 'write address = "auto"', v)
    for key in v:
        if key not in RAY_TOP_KEYS:
            raise unknown_key(ctx, path, key, RAY_TOP_KEYS)
    address = v.get("address")
    if address is not None:
        address = as_str(ctx, f"{path}.address", address, '"auto" or "ray://head:10001"')
        if address != "auto" and not re.match(r"(ray://)?[^\s/]+:\d+$", address):
            raise ctx.error(
                f"{path}.address",
                'must be "auto", "ray://host:port" or "host:port"',
                "write the cluster's address, or leave it unset for a local cluster",
                address,
            )
    num_cpus = v.get("num_cpus")
    if num_cpus is not None and (
        isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1
    ):
        raise ctx.error(f"{path}.num_cpus", "must be an integer of 1 or more", "write 2", num_cpus)
    namespace = as_str(ctx, f"{path}.namespace", v.get("namespace", "mlbridge"), '"mlbridge"')
    return RayConfig(address, num_cpus, namespace)


def ray_config_to_mapping(cfg: RayConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.address is not None:
        out["address"] = cfg.address
    if cfg.num_cpus is not None:
        out["num_cpus"] = cfg.num_cpus
    if cfg.namespace != "mlbridge":
        out["namespace"] = cfg.namespace
    return out
