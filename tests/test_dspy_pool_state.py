"""The DSPy bridge's pool-wide behaviour through ``MLBridge`` (the host's bridge-wide state and
``stream_resource``):

* ``configure_lm`` reaches every worker of a pool of 3, and the replacements after ``kill -9``;
* ``stream_resource`` streams a DSPy program's fields, then its result (``.result``).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from dspy_helpers import dspy_env, run_in_process
from host_helpers import wait_until
from mlbridge import BridgeConfig, BridgeOptions, MLBridge, MLBridgeConfig

dspy = pytest.importorskip("dspy")
DummyLM = dspy.utils.DummyLM

pytestmark = pytest.mark.dspy

BY_QUESTION = {f"question {i}": {"answer": f"answer {i}"} for i in range(3)}


def _bridge(tmp: Path, pool_size: int) -> MLBridge:
    cfg = BridgeConfig(
        "dspy",
        python_module="dspy",
        pool_size=pool_size,
        env=dspy_env(tmp),
        options=BridgeOptions(timeout=60.0, startup_timeout=60.0, health_check_interval=0.5),
    )
    return MLBridge(
        MLBridgeConfig(bridges={"dspy": cfg}, default_bridge="dspy"), env_overrides=False
    )


def _workers(b: MLBridge) -> dict[str, int]:
    return {w["id"]: int(w["pid"]) for w in b.statistics()["pools"]["dspy"]["workers"]}


def _concurrently(b: MLBridge, rid: str, n: int) -> list[dict[str, Any]]:
    """``n`` calls at once: each keeps a worker busy ~0.5 s, so each lands on its own worker."""
    out: list[Any] = [None] * n

    def call(i: int) -> None:
        out[i] = b.execute_resource("dspy", rid, {"question": f"question {i}"})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_configure_lm_reaches_every_worker_and_the_replacements(tmp_path: Path) -> None:
    slow = {"class": "dspy_helpers:SlowDummyLM", "kwargs": {"answers": BY_QUESTION}}
    with _bridge(tmp_path, 3) as b:
        b.execute("dspy", "configure_lm", slow)
        # No program LM and no transformers bridge: a worker without the bridge-wide LM would
        # fall back to the local model and fail its call back.
        rid = b.create_resource("dspy", "program", {"signature": "question -> answer"})
        first = _concurrently(b, rid, 3)
        assert [r["outputs"] for r in first] == list(BY_QUESTION.values())
        assert len({r["worker_id"] for r in first}) == 3
        old = _workers(b)
        for pid in old.values():
            os.kill(pid, signal.SIGKILL)
        # (three workers importing DSPy at once: slow on a loaded 2-CPU CI machine)
        assert wait_until(lambda: len(_workers(b)) == 3 and not set(_workers(b)) & set(old), 120)
        again = _concurrently(b, rid, 3)
        assert [r["outputs"] for r in again] == list(BY_QUESTION.values())
        assert {r["worker_id"] for r in again} == set(_workers(b))


def test_stream_resource_streams_fields_then_the_result(tmp_path: Path) -> None:
    answers = [{"reasoning": "Paris is the capital of France.", "answer": "Paris"}] * 2
    expected = run_in_process(
        dspy.ChainOfThought("question -> answer"), DummyLM(answers), question="Capital?"
    )
    lm = {"class": "dspy_helpers:StreamingDummyLM", "kwargs": {"answers": answers}}
    config = {"signature": "question -> answer", "program_type": "chain_of_thought", "lm": lm}
    with _bridge(tmp_path, 2) as b:
        rid = b.create_resource("dspy", "program", config)
        stream = b.stream_resource("dspy", rid, {"question": "Capital?"})
        chunks = list(stream)
        for name, value in expected.items():
            assert "".join(c["delta"] for c in chunks if c["field"] == name).strip() == value
        assert stream.result["outputs"] == expected
