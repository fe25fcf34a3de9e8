"""`make demo` runs the tour; its echo part runs here end to end (the model steps load real
models and are covered by the Transformers/DSPy tests and the README runner), and the
conversion progress bar is driven with the events the Transformers bridge streams."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlbridge.cli._progress import ProgressBar
from mlbridge.demo import NEXT_STEPS


def test_demo_echo_tour_runs_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mlbridge.demo", "--no-models"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "execute('echo', 'echo', {'hello': 'world'}) -> {'hello': 'world'}" in text
    assert "the pool replaced it: value 43" in text
    # the timeout error is printed whole: its fix hint is not cut off
    hung = next(line for line in text.splitlines() if line.startswith("a hung call"))
    assert "CallTimeoutError" in hung and not hung.endswith("...")
    assert "timeout" in hung.split("CallTimeoutError: ", 1)[1]
    assert "all workers stopped" in text
    # how long each part took, then three commands to try next
    timings = text.split("== how long each part took", 1)[1].split("== try next", 1)[0]
    for part in ("start the host", "echo: calls, stream, kill -9", "status", "total"):
        line = next(ln for ln in timings.splitlines() if ln.strip().startswith(part))
        assert line.rstrip().split()[-1] == "ok" or "s" in line
        assert any(
            tok.endswith("s") and tok[:-1].replace(".", "").isdigit() for tok in line.split()
        )
    tail = text.split("== try next", 1)[1]
    assert len(NEXT_STEPS) == 3
    for command, _ in NEXT_STEPS:
        assert command in tail


def test_progress_bar_shows_tensors_and_an_estimate() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.update({"model": "local:smollm2", "stage": "convert_start"})
    bar.update({"stage": "convert_tokenizer_done", "elapsed_s": 0.4})
    for done in (27, 54, 81):
        bar.update({"stage": "convert_tensors", "done": done, "total": 272})
    line = bar.line()
    assert "[" in line and "81/272 tensors" in line
    assert "left for the weights" in line  # an estimate from the rate so far
    assert "converting the model once" in out.getvalue()
    bar.update({"stage": "convert_tensors", "done": 272, "total": 272})
    bar.update({"stage": "convert_weights_done", "elapsed_s": 12.0})
    bar.update({"stage": "convert_done", "elapsed_s": 19.5})
    bar.update({"stage": "ready", "elapsed_s": 0.3})
    bar.finish()
    assert bar.converted_in == 19.5
    lines = out.getvalue().splitlines()
    assert any("272/272 tensors" in ln for ln in lines)
    assert lines[-1].startswith("model ready")
    assert len(lines) == len(set(lines))  # not a terminal: one line per change, no repeats


def test_progress_bar_stays_quiet_for_a_cached_model() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.update({"stage": "loading", "elapsed_s": 1.0})
    assert out.getvalue() == ""  # a one-second load from the cache draws nothing
    bar.update({"stage": "load_start"})
    assert out.getvalue().startswith("loading the model")


@pytest.mark.gateway
def test_demo_runs_through_the_gateway(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBRIDGE_")}
    env["MLBRIDGE_RUNTIME_DIR"] = str(tmp_path / "runtime")
    out = subprocess.run(
        [sys.executable, "-m", "mlbridge.demo", "--gateway", "--no-models"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert "every step below goes through it" in text
    assert "the pool replaced it: value 43" in text  # kill -9 recovery, seen over HTTP
    assert "start the host + gateway" in text
    assert "REST under http://127.0.0.1:" in text
    assert "all workers stopped" in text
    assert not (tmp_path / "runtime" / "gateway.json").exists()  # the server cleaned up
