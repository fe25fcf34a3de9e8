"""The host's side of a bridge environment build: run it off the loop, report progress events."""

from __future__ import annotations

import asyncio
import contextlib

from .._envs import BuildProgress, BuildResult, build
from ..config import BridgeConfig
from .telemetry import Emitter, ProgressEvent

__all__ = ["prepare_environment"]


async def prepare_environment(cfg: BridgeConfig, emit: Emitter) -> BuildResult:
    """Build ``cfg``'s environment in a thread (or find it cached), emitting ``progress``
    telemetry events on this loop while it builds."""
    assert cfg.environment is not None
    loop = asyncio.get_running_loop()

    def on_progress(p: BuildProgress) -> None:
        event = ProgressEvent(cfg.name, "environment", p.step, p.total, p.message)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            loop.call_soon_threadsafe(emit, event)

    return await asyncio.to_thread(build, cfg.environment, bridge=cfg.name, progress=on_progress)
