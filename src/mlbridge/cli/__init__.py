"""The ``mlbridge`` command line.

::

    mlbridge call <bridge> <command> [json-args] [--timeout S] [--stream [--final]] [--url URL]
                  [--config PATH]
    mlbridge status [--json] [--bridge NAME] [--wait-timeout S] [--url URL] [--config PATH]
    mlbridge doctor [--json] [--timeout S] [--config PATH]
    mlbridge list   [--json] [--config PATH]
    mlbridge bench  [--quick]
    mlbridge env build|list|prune [--json] [--config PATH]   (per-bridge environments)
    mlbridge serve  [--host H] [--port P] [--token T] [--config PATH] ...

Config: ``--config PATH``, else ``$MLBRIDGE_CONFIG``, else the nearest ``mlbridge.toml`` /
``pyproject.toml`` with ``[tool.mlbridge]``, else the built-in bridges; ``MLBRIDGE_*`` variables
apply over it. ``call`` and ``status`` use a running host when there is one (``--url``,
``$MLBRIDGE_URL``, or the run-time file of ``mlbridge serve``; token ``$MLBRIDGE_TOKEN``), else
they start a throw-away host and say so on stderr (see :mod:`mlbridge.cli._remote`).

:func:`main` takes ``argv`` and returns the exit code, so tests call it in-process. Exit codes
are listed in :mod:`mlbridge.cli._errors` (``mlbridge --help`` prints them too).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from ._errors import EXIT_USAGE, UsageError, report

__all__ = ["entry", "main"]

_EPILOG = """\
exit codes: 0 ok; 1 problems found (doctor/status) or unexpected error; 2 usage or bad
json-args; 3 config error; 4 unknown bridge; 5 the bridge's command failed; 6 timeout;
7 worker crashed; 8 bridge unavailable/broken; 9 protocol error; 130 interrupted.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so :func:`main` returns the code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}. Fix: see `{self.prog} --help`")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds as a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        help="mlbridge.toml or pyproject.toml (default: $MLBRIDGE_CONFIG, then the nearest "
        "one from the working directory up, then the built-in bridges)",
    )


def _add_url(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        metavar="URL",
        help="the running host's gateway, e.g. http://127.0.0.1:8765 (default: $MLBRIDGE_URL, "
        "then the run-time file of `mlbridge serve`; none: a throw-away host for this command; "
        "token: $MLBRIDGE_TOKEN)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mlbridge",
        description="Run ML frameworks side by side in supervised worker processes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("call", help="run one command on a bridge and print its result as JSON")
    p.add_argument("bridge", help="bridge name, e.g. echo")
    p.add_argument("command", help="the bridge's command, e.g. echo")
    p.add_argument(
        "json_args",
        nargs="?",
        metavar="json-args",
        help="the command's arguments as one JSON object ('-' reads stdin)",
    )
    p.add_argument("--timeout", type=_positive, metavar="S", help="per-call timeout in seconds")
    p.add_argument(
        "--stream", action="store_true", help="print chunks as they arrive, one JSON per line"
    )
    p.add_argument(
        "--final", action="store_true", help="with --stream: print the return value last"
    )
    p.add_argument(
        "--msgpack",
        action="store_true",
        help="write the result as binary MessagePack (numpy arrays as ext type 1), not JSON",
    )
    _add_url(p)
    _add_config(p)

    p = sub.add_parser("status", help="pools, workers, pids, RSS, requests of the running host")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--bridge", metavar="NAME", help="only this bridge")
    p.add_argument(
        "--wait-timeout",
        type=_positive,
        default=120.0,
        metavar="S",
        help="how long to wait for each pool to be ready (default 120)",
    )
    _add_url(p)
    _add_config(p)

    p = sub.add_parser(
        "restart", help="restart a bridge's pool in the running host (e.g. one broken at boot)"
    )
    p.add_argument("bridge", help="bridge name, e.g. echo")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--timeout", type=_positive, default=300.0, metavar="S", help="how long to wait (300)"
    )
    _add_url(p)

    p = sub.add_parser("doctor", help="check config, interpreters, packages and env vars")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--timeout",
        type=_positive,
        metavar="S",
        help="how long each bridge's import probe may take (default 120)",
    )
    _add_config(p)

    p = sub.add_parser("list", help="bridges, and whether their packages are installed")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_config(p)

    from ._serve import add_serve_parser  # mlbridge serve (the HTTP gateway)

    add_serve_parser(sub, _add_config)

    p = sub.add_parser("bench", help="run the benchmark suite (same as python -m bench)")
    p.add_argument("--quick", action="store_true", help="fewer iterations")

    from ._env import add_env_parser  # per-bridge environments (issue 14)

    add_env_parser(sub, _add_config)
    return parser


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it per call)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # logging must never break the command
            self.handleError(record)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("mlbridge")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("mlbridge: %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)


def _dispatch(cmd: str) -> Callable[[argparse.Namespace], int]:
    if cmd in ("call", "status", "restart"):
        from . import _commands

        runs = {"call": _commands.run_call, "status": _commands.run_status}
        return runs.get(cmd, _commands.run_restart)
    if cmd in ("doctor", "list"):
        from . import _doctor

        return _doctor.run_doctor if cmd == "doctor" else _doctor.run_list
    if cmd == "env":
        from . import _env

        return _env.run_env
    if cmd == "serve":
        from . import _serve

        return _serve.run_serve
    from . import _bench

    return _bench.run_bench


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        return report(exc)
    except SystemExit as exc:  # --help / --version
        return int(exc.code) if isinstance(exc.code, int) else 0
    if ns.cmd is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _setup_logging(ns.verbose)
    try:
        return _dispatch(ns.cmd)(ns)
    except (Exception, KeyboardInterrupt) as exc:
        if ns.verbose >= 2:
            logging.getLogger("mlbridge.cli").exception("command failed")
        return report(exc)


def entry() -> None:
    """The ``mlbridge`` console script."""
    sys.exit(main())
