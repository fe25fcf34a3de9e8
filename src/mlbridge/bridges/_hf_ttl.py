"""``model_ttl`` for the Transformers bridge: the setting's parser and the sweeper thread that
unloads models a worker has not used for that long (it takes only the model store's lock)."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from .._config_values import parse_duration
from ..errors import InvalidConfigurationError

if TYPE_CHECKING:
    from ._hf_models import ModelStore

__all__ = ["model_ttl", "start_model_sweeper"]

logger = logging.getLogger("mlbridge.bridge.transformers")


def model_ttl(raw: Any) -> float | None:
    """The ``model_ttl`` setting as seconds (None: models stay loaded)."""
    if raw is None:
        return None
    seconds = parse_duration(raw) if isinstance(raw, str) else raw
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise InvalidConfigurationError(
            f"setting 'model_ttl' must be a positive duration (seconds, or a string such as "
            f"'10m'), got {raw!r}; leave it out to keep models loaded"
        )
    return float(seconds)


def start_model_sweeper(store: ModelStore, ttl: float) -> threading.Thread:
    """A daemon thread that unloads models unused for ``ttl`` seconds (checks every ttl/4,
    at most every 5 s). It takes only the store's lock, like any load."""
    period = min(max(ttl / 4, 0.05), 5.0)

    def sweep() -> None:
        while True:
            time.sleep(period)
            try:
                gone = store.unload_unused(ttl)
            except Exception:  # never let the sweep kill the worker
                logger.exception("model_ttl sweep failed")
                continue
            for ref in gone:
                logger.info("unloaded %s: unused for %gs (model_ttl)", ref, ttl)

    thread = threading.Thread(target=sweep, name="mlbridge-model-ttl", daemon=True)
    thread.start()
    return thread
