"""``mlbridge bench``: the benchmark suite of a source checkout (``python -m bench``).

The suite lives in ``bench/`` at the repository root, not in the installed package. It is found
on ``sys.path`` (run from the checkout), else next to this package's ``src/`` folder.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ._errors import UsageError

__all__ = ["run_bench"]


def _checkout_root() -> Path | None:
    root = Path(__file__).resolve().parents[3]  # src/mlbridge/cli/_bench.py -> repo root
    return root if (root / "bench" / "__main__.py").is_file() else None


def run_bench(ns: argparse.Namespace) -> int:
    argv = ["--quick"] if ns.quick else []
    try:
        suite = importlib.import_module("bench.__main__")
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", "bench.__main__"):
            raise
        root = _checkout_root()
        if root is None:
            raise UsageError(
                "the benchmark suite is not installed: it ships in the bench/ folder of the "
                "mlbridge source checkout. Fix: run `mlbridge bench` (or `python -m bench`) "
                "from a checkout"
            ) from None
        sys.path.insert(0, str(root))
        suite = importlib.import_module("bench.__main__")
    code: int = suite.main(argv)
    return code
