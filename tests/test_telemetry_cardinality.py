"""Telemetry keys and Prometheus series stay bounded whatever command names callers send."""

from __future__ import annotations

import asyncio

import pytest

from host_helpers import config, echo_cfg
from mlbridge import errors
from mlbridge._api import AsyncMLBridge, MLBridge
from mlbridge._host.telemetry import OTHER, UNREGISTERED, RequestEvent, Telemetry

pytestmark = pytest.mark.timeout(300)


def _labels(t: Telemetry) -> set[str]:
    return {cmd for (_, cmd, _) in t.request_totals}


def test_unknown_commands_fold_into_one_series_through_a_real_host() -> None:
    seen: list[str] = []
    with MLBridge(config(echo_cfg(pool_size=2))) as b:
        b.add_hook(lambda ev: seen.append(ev.command) if isinstance(ev, RequestEvent) else None)
        assert b.execute("echo", "echo", {"x": 1}) == {"x": 1}
        for i in range(2000):
            # Unknown commands, and commands in a namespace this bridge does not have.
            command = f"no_such_command_{i}" if i % 2 else f"other{i}:echo"
            with pytest.raises(errors.UnknownCommandError):
                b.execute("echo", command)
        b.execute("echo", "ping")
        telemetry = b._host.telemetry
        telemetry.drain()
        assert _labels(telemetry) == {"echo", "ping", UNREGISTERED}
        assert telemetry.request_totals[("echo", UNREGISTERED, False)][0] == 2000
        text = b.prometheus()
    # A fixed size whatever the number of junk names: a few series, latency histograms included.
    assert len(text) < 8000, len(text)
    # prometheus-client writes labels in name order and values as floats.
    assert 'command="<unregistered>",framework="echo",success="false"} 2000.0' in text
    assert "no_such_command" not in text and "other1" not in text
    # Hooks still see each call as it was made.
    assert len(seen) == 2002 and "no_such_command_1" in seen and "other0:echo" in seen


def test_the_async_path_folds_the_same_way() -> None:
    async def main() -> set[str]:
        async with AsyncMLBridge(config(echo_cfg())) as b:
            await b.execute("echo", "echo", {})
            for i in range(300):
                with pytest.raises(errors.UnknownCommandError):
                    await b.execute("echo", f"junk_{i}")
            b._host.telemetry.drain()  # (counted in batches; statistics readers drain first)
            return _labels(b._host.telemetry)

    assert asyncio.run(main()) == {"echo", UNREGISTERED}


def _event(command: str, ok: bool, code: str | None = None) -> RequestEvent:
    return RequestEvent("echo", command, 0.001, ok, "echo-1", code)


def test_other_failures_of_never_succeeded_commands_are_capped() -> None:
    t = Telemetry(max_commands=5)
    t.emit(_event("echo", True))
    for i in range(100):  # e.g. junk names that timed out before the worker refused them
        t.emit(_event(f"junk_{i}", False, "timeout"))
    labels = _labels(t)
    assert len(labels) == 6 and OTHER in labels and "echo" in labels
    assert t.request_totals[("echo", OTHER, False)][0] == 96
    # A command that succeeds is registered: it gets its own series even past the cap, and
    # keeps it for its failures.
    t.emit(_event("predict", True))
    t.emit(_event("predict", False, "model_error"))
    assert t.request_totals[("echo", "predict", True)][0] == 1
    assert t.request_totals[("echo", "predict", False)][0] == 1
    # A command with a series keeps it; unknown commands never take one.
    t.emit(_event("junk_0", False, "timeout"))
    assert t.request_totals[("echo", "junk_0", False)][0] == 2
    t.emit(_event("nope", False, "unknown_command"))
    t.emit(_event("x:nope", False, "invalid_namespace"))
    assert t.request_totals[("echo", UNREGISTERED, False)][0] == 2
