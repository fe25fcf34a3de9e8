"""Secret redaction for reprs, log lines and error messages (mlbridge._redact)."""

from __future__ import annotations

import doctest
import json
from types import MappingProxyType

import pytest

import mlbridge._redact
from mlbridge._redact import MASK, is_secret_key, redact, redact_text, secret_values


@pytest.mark.parametrize(
    "key",
    [
        "api_key",
        "OPENAI_API_KEY",
        "apiKey",
        "key",
        "hf_token",
        "HF_TOKEN",
        "access_tokens",
        "client_secret",
        "password",
        "DB_PASSWORD",
        "passwd",
        "aws_credentials",
        "Authorization",
        "keyfile",
    ],
)
def test_secret_looking_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "model",
        "tokenizer",
        "tokenizer_name",
        "max_tokens",
        "max_new_tokens",
        "num_tokens",
        "prompt_tokens",
        "keywords",
        "temperature",
        "",
    ],
)
def test_harmless_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_non_string_keys_are_not_secret() -> None:
    assert not is_secret_key(1)
    assert redact({1: "x", ("api_key",): "y"}) == {1: "x", ("api_key",): "y"}


def test_redact_masks_nested_mappings_and_lists_and_copies() -> None:
    settings = {
        "model": "gpt-4o-mini",
        "api_key": "sk-live-123",
        "lm": {"Authorization": "Bearer abc", "max_tokens": 256, "tokenizer": "gpt2"},
        "servers": [{"url": "https://a", "token": "t1"}, {"url": "https://b", "token": 42}],
        "pair": ("x", {"secret": ["s1", "s2"]}),
        "credentials": {"user": "me", "pw": "hunter2"},
    }
    original = json.dumps(settings, default=list)
    out = redact(settings)
    assert out == {
        "model": "gpt-4o-mini",
        "api_key": MASK,
        "lm": {"Authorization": MASK, "max_tokens": 256, "tokenizer": "gpt2"},
        "servers": [{"url": "https://a", "token": MASK}, {"url": "https://b", "token": MASK}],
        "pair": ("x", {"secret": MASK}),
        "credentials": MASK,  # a whole sub-mapping under a secret key
    }
    assert json.dumps(settings, default=list) == original  # the input is not changed


def test_redact_accepts_read_only_mappings_and_shows_unset_values() -> None:
    env = MappingProxyType({"HF_TOKEN": "hf_abc", "OPENAI_API_KEY": "", "PASSWORD": None})
    assert redact(env) == {"HF_TOKEN": MASK, "OPENAI_API_KEY": "", "PASSWORD": None}
    assert redact({"use_auth_token": True}) == {"use_auth_token": True}


def test_redact_leaves_non_mappings_alone() -> None:
    assert redact("api_key=sk") == "api_key=sk"
    assert redact([1, "a"]) == [1, "a"]
    assert redact(None) is None


def test_secret_values_collects_every_leaf_under_secret_keys() -> None:
    found = secret_values(
        {
            "api_key": "sk-1234",
            "model": "gpt2",
            "nested": [{"token": {"a": "tok-5678", "b": ["tok-9999"]}}],
            "port": 8080,
            "pin_password": 123456,
        }
    )
    assert sorted(found) == ["123456", "sk-1234", "tok-5678", "tok-9999"]


def test_redact_text_masks_known_values_in_every_spelling() -> None:
    secret = 'sk-"quoted"\\x'
    argv = ["python", "--settings-json", json.dumps({"api_key": secret})]
    line = f"spawning {argv!r}; error: bad key {secret}; env={ {'k': secret}!r}"
    out = redact_text(line, [secret])
    assert secret not in out
    assert json.dumps(secret)[1:-1] not in out
    assert repr(secret)[1:-1] not in out
    assert out.count(MASK) == 3


def test_redact_text_masks_the_longest_value_first_and_skips_tiny_ones() -> None:
    assert redact_text("key abcdef and abcd", ["abcd", "abcdef"]) == "key *** and ***"
    assert redact_text("a b c abc", ["a", "abc"]) == "a b c abc"
    assert redact_text("nothing here", []) == "nothing here"


def test_module_examples() -> None:
    result = doctest.testmod(mlbridge._redact)
    assert result.attempted >= 2 and result.failed == 0
