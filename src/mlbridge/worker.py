"""Entry point of a worker process: ``python -m mlbridge.worker <bridge> [options]``.

See :mod:`mlbridge._worker.entry` for what happens at start-up.
"""

from __future__ import annotations

if __name__ == "__main__":
    from mlbridge._worker.entry import run

    run()
