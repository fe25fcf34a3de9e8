"""A program optimised through ``execute("dspy", "optimize", ...)`` keeps its demos after a
``kill -9`` of the worker that ran the optimisation (the host builds the program on whichever
worker runs ``optimize`` and keeps the state its reply carries)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from dspy_helpers import dummy, run_in_process
from host_helpers import wait_until
from test_dspy_pool_state import _bridge, _workers

dspy = pytest.importorskip("dspy")
DummyLM = dspy.utils.DummyLM

pytestmark = pytest.mark.dspy

TRAIN = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]


def test_optimised_demos_survive_kill_9_of_the_worker_that_optimised(tmp_path: Path) -> None:
    config = {"signature": "question -> answer", "lm": dummy([], follow_examples=True)}
    reference = dspy.LabeledFewShot(k=3).compile(
        dspy.Predict("question -> answer"),
        trainset=[dspy.Example(**ex).with_inputs("question") for ex in TRAIN],
    )
    expected = run_in_process(reference, DummyLM([], follow_examples=True), question="q2")
    with _bridge(tmp_path, 2) as b:
        rid = b.create_resource("dspy", "program", config)
        out = b.execute(
            "dspy",
            "optimize",
            {
                "program": rid,
                "optimizer": "labeled_few_shot",
                "trainset": TRAIN,
                "params": {"k": 3},
            },
        )
        assert out["demos"] == 3
        (record,) = b.list_resources("dspy", "program")
        assert record["has_state"] is True
        os.kill(_workers(b)[out["worker_id"]], signal.SIGKILL)
        assert wait_until(lambda: out["worker_id"] not in _workers(b) and len(_workers(b)) == 2, 60)
        seen = set()
        for _ in range(6):
            got = b.execute_resource("dspy", rid, {"question": "q2"})
            assert got["outputs"] == expected  # the demos are in every worker's prompt
            seen.add(got["worker_id"])
        assert out["worker_id"] not in seen
