"""Shared by the DSPy bridge tests, and importable by DSPy workers (tests/ is on their PYTHONPATH).

* ``add``, ``multiply``: tools for ReAct programs (``"dspy_helpers:add"``);
* ``QAWithContext``: a user ``dspy.Module`` with two predictors (``"dspy_helpers:QAWithContext"``);
* ``answer_match``: an optimisation metric (``"dspy_helpers:answer_match"``);
* ``StreamingDummyLM``: DSPy's own ``DummyLM`` answers, delivered through a custom DSPy engine that
  streams them a few characters at a time (``DummyLM`` itself never streams), so stream tests get
  exact, scripted chunks; ``SlowDummyLM`` answers after a delay; ``JSONDummyLM`` / ``XMLDummyLM``
  format their answers for those adapters;
* ``dspy_worker`` / ``dspy_env``: a real ``python -m mlbridge.worker dspy`` process for a test.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Never DSPy's default ~/.dspy_cache: set before dspy is imported (it opens the cache then).
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="mlbridge-dspy-cache-"))

import dspy
from dspy.clients.engines.dummy_engine import DummyEngine
from dspy.lm15 import (
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    Usage,
)
from dspy.utils.dummies import DummyLM

TESTS_DIR = Path(__file__).resolve().parent
DUMMY = "dspy.utils.dummies:DummyLM"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def slow_add(a: int, b: int) -> int:
    """Add two integers, slowly (one second), noting each run in $MLBRIDGE_TEST_MARKER."""
    marker = os.environ.get("MLBRIDGE_TEST_MARKER")
    if marker:
        with open(marker, "a") as f:
            f.write("ran\n")
    time.sleep(1.0)
    return a + b


def answer_match(example: Any, prediction: Any, trace: Any = None) -> bool:
    return str(example.answer).strip().lower() == str(prediction.answer).strip().lower()


class QAWithContext(dspy.Module):  # type: ignore[misc]
    """Draft a context for the question, then answer from it (two LM calls)."""

    def __init__(self, style: str = "short") -> None:
        super().__init__()
        self.style = style
        self.draft = dspy.Predict("question -> context")
        self.answer = dspy.ChainOfThought("context, question -> answer")

    def forward(self, question: str) -> Any:
        context = self.draft(question=question).context
        pred = self.answer(context=f"[{self.style}] {context}", question=question)
        return dspy.Prediction(context=context, reasoning=pred.reasoning, answer=pred.answer)


class JSONDummyLM(DummyLM):  # type: ignore[misc]
    """DSPy's DummyLM formatting its scripted answers for the JSON adapter."""

    def __init__(self, answers: Any) -> None:
        super().__init__(answers, adapter=dspy.JSONAdapter())


class XMLDummyLM(DummyLM):  # type: ignore[misc]
    """DSPy's DummyLM formatting its scripted answers for the XML adapter."""

    def __init__(self, answers: Any) -> None:
        super().__init__(answers, adapter=dspy.XMLAdapter())


class _SlowEngine:
    def __init__(self, answers: Any, latency_s: float) -> None:
        self._engine = DummyEngine(DummyLM(answers))
        self.latency_s = latency_s

    def complete(self, request: Any) -> Any:
        time.sleep(self.latency_s)
        return self._engine.complete(request)

    def close(self) -> None:
        pass


class SlowDummyLM(dspy.LM):  # type: ignore[misc]
    """``DummyLM(answers)`` answering after ``latency_s``, like a remote provider (a call that
    keeps its worker busy for a while, so concurrent calls land on different workers)."""

    def __init__(self, answers: Any, latency_s: float = 0.5) -> None:
        super().__init__(
            "scripted/slow", engine=_SlowEngine(answers, latency_s), cache=False, num_retries=0
        )


class _ScriptedStreamEngine:
    """DummyLM's scripted answers as a DSPy engine whose ``stream`` yields small pieces."""

    def __init__(self, answers: Any, chunk_chars: int, delay_s: float = 0.0) -> None:
        self._engine = DummyEngine(DummyLM(answers))
        self.chunk_chars = chunk_chars
        self.delay_s = delay_s

    def complete(self, request: Any) -> Any:
        return self._engine.complete(request)

    def stream(self, request: Any) -> Iterator[Any]:
        text = self.complete(request).message.parts[0].text
        yield StreamStartEvent(id=None, model="scripted")
        for i in range(0, len(text), self.chunk_chars):
            time.sleep(self.delay_s)
            yield StreamDeltaEvent(delta=TextDelta(text=text[i : i + self.chunk_chars]))
        yield StreamEndEvent(
            finish_reason="stop", usage=Usage(input_tokens=7, output_tokens=5, total_tokens=12)
        )

    def close(self) -> None:
        pass


class StreamingDummyLM(dspy.LM):  # type: ignore[misc]
    """A ``dspy.LM`` answering like ``DummyLM(answers)``, streaming ``chunk_chars`` at a time
    (each piece after ``delay_s``)."""

    def __init__(self, answers: Any, chunk_chars: int = 4, delay_s: float = 0.0) -> None:
        super().__init__(
            "scripted/dummy",
            engine=_ScriptedStreamEngine(answers, chunk_chars, delay_s),
            cache=False,
            num_retries=0,
        )


def dummy(answers: Any, **kwargs: Any) -> dict[str, Any]:
    """An LM spec for DSPy's DummyLM (list or dict mode)."""
    return {"class": DUMMY, "kwargs": {"answers": answers, **kwargs}}


def dspy_env(tmp: Path) -> dict[str, str]:
    """Environment for DSPy workers: tests/ importable, DSPy's disk cache in ``tmp``."""
    path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "DSPY_CACHEDIR": str(tmp / "dspy-cache")}


def run_in_process(program: Any, lm: Any, adapter: Any = None, **inputs: Any) -> dict[str, Any]:
    """Run a DSPy program here with ``lm``: the reference for the parity tests."""
    settings: dict[str, Any] = {"lm": lm}
    if adapter is not None:
        settings["adapter"] = adapter
    with dspy.context(**settings):
        pred = program(**inputs)
    return dict(pred.toDict())
