"""Signature parsing and LM specs, in this process (the worker tests cover them over the wire)."""

from __future__ import annotations

import typing
from typing import Any

import pytest

pytest.importorskip("dspy")

import dspy

from mlbridge.bridges._dspy_lm import normalize_spec, public_spec
from mlbridge.bridges._dspy_signatures import build_signature, describe_signature, parse_type
from mlbridge.errors import InvalidConfigurationError

pytestmark = pytest.mark.dspy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("str", str),
        ("integer", int),
        ("number", float),
        ("boolean", bool),
        ("list[str]", list[str]),
        ("dict[str, int]", dict[str, int]),
        ("Literal['a', 'b']", typing.Literal["a", "b"]),
        ("Optional[int]", typing.Optional[int]),  # noqa: UP045 - what the name parses to
        ("int | None", typing.Optional[int]),  # noqa: UP045
        ("list[dict[str, float]]", list[dict[str, float]]),
        (None, str),
    ],
)
def test_type_names_parse_to_python_types(text: Any, expected: Any) -> None:
    assert parse_type(text) == expected


@pytest.mark.parametrize(
    "text", ["complex", "__import__('os')", "list[int, str]", "dict[str]", "Literal[x]", "1 +"]
)
def test_other_type_expressions_are_refused_never_evaluated(text: str) -> None:
    with pytest.raises(InvalidConfigurationError):
        parse_type(text)


def test_string_and_dict_forms_build_the_same_fields_as_dspy() -> None:
    ours = build_signature("question: str, ctx: list[str] -> answer: int")
    theirs = dspy.Signature("question: str, ctx: list[str] -> answer: int")
    assert ours.signature == theirs.signature
    assert {n: f.annotation for n, f in ours.fields.items()} == {
        n: f.annotation for n, f in theirs.fields.items()
    }
    spec = {
        "inputs": [{"name": "question"}, {"name": "ctx", "type": "list[str]"}],
        "outputs": [{"name": "answer", "type": "int"}],
    }
    from_dict = build_signature(spec, "Answer with a number.")
    assert from_dict.signature == theirs.signature
    assert from_dict.instructions == "Answer with a number."
    described = describe_signature(from_dict)
    assert [f["type"] for f in described["inputs"]] == ["str", "list[str]"]
    assert described["outputs"] == [{"name": "answer", "description": None, "type": "int"}]


def test_lm_specs_fold_the_old_provider_and_hide_secrets() -> None:
    spec = normalize_spec({"model": "gemini-1.5-flash", "provider": "google", "api_key": "k"})
    assert spec["model"] == "gemini/gemini-1.5-flash" and spec["provider"] == "google"
    shown = public_spec({**spec, "kwargs": {"token": "t", "top_p": 0.9}, "api_base": "http://x/v1"})
    assert shown is not None
    assert "k" not in shown.values() and "api_key" not in shown
    assert shown["api_key_set"] is True
    assert shown["kwargs"] == {"top_p": 0.9}
    assert normalize_spec("local:smollm2")["provider"] == "mlbridge"
    with pytest.raises(InvalidConfigurationError, match="max_tokens"):
        normalize_spec({"model": "openai/x", "max_tokens": 1.5})
