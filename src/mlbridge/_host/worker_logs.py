"""Which of a worker's stderr lines the host re-logs above DEBUG.

A worker's stderr is drained by the host (:class:`~mlbridge._host.exits.StderrTail`) and each
line is logged on the pool's logger, at DEBUG: most of it is framework noise. Lines a bridge
writes through its own logger (:func:`mlbridge.bridges._logs.setup_bridge_logging`: ``<time>
mlbridge.bridge.<name>[<pid>] <LEVEL> <message>``) are meant for people, e.g. the Transformers
bridge's model-load progress ("model local:smollm2: convert_tensors (done=54 total=272)") during
a call that does not stream: those keep their level, so ``mlbridge -v`` or an application's
INFO logging shows them.
"""

from __future__ import annotations

import logging
import re

__all__ = ["bridge_log_level"]

_BRIDGE_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ mlbridge\.bridge\.[\w.-]+\[\d+\] "
    r"(?P<level>INFO|WARNING|ERROR|CRITICAL) "
)


def bridge_log_level(line: str) -> int:
    """The level to log a worker's stderr ``line`` at: its own for a bridge log line, else DEBUG."""
    m = _BRIDGE_LINE.match(line)
    if m is None:
        return logging.DEBUG
    return int(getattr(logging, m.group("level")))
