"""Logging for a bridge inside its worker: to stderr (which the host drains and logs), once."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

__all__ = ["setup_bridge_logging"]


def setup_bridge_logging(logger: logging.Logger, level: Any, default: str) -> None:
    """Give ``logger`` one stderr handler naming the worker's pid, at ``level`` (a setting;
    ``default`` when unset). A second call changes nothing."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(name)s[{os.getpid()}] %(levelname)s %(message)s")
    )
    logger.addHandler(handler)
    logger.setLevel(str(level or default).upper())
    logger.propagate = False
