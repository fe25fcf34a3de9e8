"""The DSPy bridge under the launch line of the original DSPex host.

An Elixir/Erlang host that ran ``python3 <priv>/dspy_bridge.py --mode pool-worker --worker-id w1``
over a ``{packet, 4}`` port points ``python_script`` at this file instead (its path:
``python -c "import mlbridge.bridges.dspy_bridge as m; print(m.__file__)"``), or runs
``python -m mlbridge.bridges.dspy_bridge --mode pool-worker --worker-id w1``. It serves exactly
what ``python -m mlbridge.worker dspy`` serves: the old commands and reply shapes (JSON frames,
first request ``ping`` with id 0, failures as failure replies, exit 0 when the port closes), plus
everything newer hosts negotiate with ``hello``. mlbridge's own host accepts the file too:
``start_bridge("dspy", python_script=<that path>)`` (the class below).

Run as a script, Python puts this file's folder first on ``sys.path``; that folder also holds
``dspy.py`` and ``transformers.py`` (mlbridge's bridges), which would shadow the real ``dspy``
package. So the folder is taken off ``sys.path`` before anything is imported (and again before
the framework loads, for loaders that put it back), and mlbridge's own ``src`` folder is put on it
when mlbridge is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _fix_path() -> None:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    if importlib.util.find_spec("mlbridge") is None:  # not installed: use this checkout's src/
        sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))


if __name__ == "__main__" and not __package__:
    _fix_path()

from mlbridge.bridges.dspy import DSPyBridge  # noqa: E402 - after the path fix above


class DSPexBridge(DSPyBridge):
    """The DSPy bridge, loadable from this file by a ``python_script`` loader."""

    def _initialize_framework(self) -> None:
        _fix_path()  # a script loader may have put this folder (and its dspy.py) on sys.path
        super()._initialize_framework()


def main(argv: list[str] | None = None) -> int:
    from mlbridge._worker.entry import main as worker_main

    return worker_main(["dspy", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # as the worker entry does: skip teardown hooks that can hang a dying worker
