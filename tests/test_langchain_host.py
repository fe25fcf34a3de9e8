"""The LangChain bridge through ``MLBridge`` with LangChain's own fake models: parity with
in-process ``invoke`` (string and chat prompts, str / json / json_schema parsers, a factory chain,
a serialized chain), batch, streaming (in order, first chunk measured before the end), per-call
config, agents with a real tool loop (one tool calling another bridge through the host), history
per session across calls and across ``kill -9``, cancel, and error kinds."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from langchain_core.language_models import FakeListChatModel
from langchain_core.load import dumpd
from langchain_core.output_parsers import JsonOutputParser, StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate

from host_helpers import wait_until
from langchain_helpers import (
    SerializableFakeChat,
    ToolCallingFakeModel,
    add,
    fake_list,
    first_chunk_times,
    generic_chain,
    lc_env,
    tool_call,
    upper_chain,
)
from mlbridge import BridgeConfig, BridgeOptions, MLBridge, MLBridgeConfig, errors

pytestmark = [pytest.mark.langchain, pytest.mark.timeout(300)]

ECHO_CHAT = {"class": "langchain_helpers:EchoChat"}


@pytest.fixture(scope="module")
def bridge() -> Iterator[MLBridge]:
    opts = BridgeOptions(
        timeout=60.0, startup_timeout=60.0, health_check_interval=1.0, cancel_grace=3.0
    )
    cfg = MLBridgeConfig(
        bridges={
            "langchain": BridgeConfig(
                "langchain", python_module="langchain", pool_size=2, env=lc_env(), options=opts
            ),
            "echo": BridgeConfig("echo", python_module="echo", options=opts),
        },
        default_bridge="langchain",
    )
    with MLBridge(cfg, env_overrides=False) as b:
        yield b


def _pids(b: MLBridge) -> list[int]:
    return sorted(int(w["pid"]) for w in b.statistics()["pools"]["langchain"]["workers"])


CHAT = [["system", "You answer in one word."], ["human", "{question}"]]
PARITY: dict[str, tuple[dict[str, Any], Any, dict[str, Any]]] = {
    "string_prompt_str_parser": (
        {"prompt": "Tell me about {topic}", "llm": fake_list(["cats are great"])},
        lambda: (
            PromptTemplate.from_template("Tell me about {topic}")
            | FakeListChatModel(responses=["cats are great"])
            | StrOutputParser()
        ),
        {"topic": "cats"},
    ),
    "chat_prompt_str_parser": (
        {"prompt": {"messages": CHAT}, "llm": fake_list(["Paris"]), "parser": "str"},
        lambda: (
            ChatPromptTemplate.from_messages([tuple(m) for m in CHAT])
            | FakeListChatModel(responses=["Paris"])
            | StrOutputParser()
        ),
        {"question": "Capital of France?"},
    ),
    "chat_prompt_json_parser": (
        {
            "prompt": {"messages": CHAT},
            "llm": fake_list(['{"city": "Paris", "n": 1}']),
            "parser": "json",
        },
        lambda: (
            ChatPromptTemplate.from_messages([tuple(m) for m in CHAT])
            | FakeListChatModel(responses=['{"city": "Paris", "n": 1}'])
            | JsonOutputParser()
        ),
        {"question": "Capital of France?"},
    ),
    "json_schema_parser": (
        {
            "prompt": "{question}",
            "llm": fake_list(['```json\n{"city": "Rome"}\n```']),
            "parser": {"json_schema": {"type": "object", "required": ["city"]}},
        },
        lambda: (
            PromptTemplate.from_template("{question}")
            | FakeListChatModel(responses=['```json\n{"city": "Rome"}\n```'])
            | JsonOutputParser()
        ),
        {"question": "Capital of Italy?"},
    ),
    "factory_chain": (
        {"factory": "langchain_helpers:upper_chain", "kwargs": {"suffix": "!"}},
        lambda: upper_chain("!"),
        {"text": "shout"},
    ),
    "factory_chain_generic_fake_chat_model": (
        {"factory": "langchain_helpers:generic_chain", "kwargs": {"messages": ["a b c"] * 2}},
        lambda: generic_chain(["a b c"] * 2),
        {"q": "letters?"},
    ),
    "factory_chain_given_the_llm": (
        {"factory": "langchain_helpers:llm_chain", "llm": fake_list(["from the factory"])},
        lambda: __import__("langchain_helpers").llm_chain(
            FakeListChatModel(responses=["from the factory"])
        ),
        {"input": "hi", "history": []},
    ),
}


@pytest.mark.parametrize("case", sorted(PARITY))
def test_chain_output_matches_invoke_in_process(bridge: MLBridge, case: str) -> None:
    config, build, inputs = PARITY[case]
    expected = build().invoke(inputs)
    rid = bridge.create_resource("langchain", "chain", config)
    assert bridge.execute_resource("langchain", rid, inputs) == expected
    assert bridge.execute_resource("langchain", rid, inputs) == build().invoke(inputs)


def test_serialized_chain_matches_invoke_in_process(bridge: MLBridge) -> None:
    def build() -> Any:
        prompt = ChatPromptTemplate.from_messages([("system", "be brief"), ("human", "{q}")])
        return prompt | SerializableFakeChat(responses=["serialized answer"]) | StrOutputParser()

    config = {"serialized": dumpd(build()), "valid_namespaces": ["langchain_helpers"]}
    rid = bridge.create_resource("langchain", "chain", config)
    out = bridge.execute_resource("langchain", rid, {"q": "why?"})
    assert out == build().invoke({"q": "why?"}) == "serialized answer"
    with pytest.raises(errors.InvalidConfigurationError, match="not allowed"):
        bridge.create_resource("langchain", "chain", {"serialized": config["serialized"]})


def test_batch_runs_batch(bridge: MLBridge) -> None:
    answers = ["one", "two", "three"]
    rid = bridge.create_resource("langchain", "chain", {"prompt": "{x}", "llm": fake_list(answers)})
    items = [{"x": str(i)} for i in range(3)]
    reference = PromptTemplate.from_template("{x}") | FakeListChatModel(responses=answers)
    expected = (reference | StrOutputParser()).batch(items, {"max_concurrency": 1})
    out = bridge.execute_resource(
        "langchain", rid, {"batch": items, "config": {"max_concurrency": 1}}
    )
    assert out == expected == answers
    with pytest.raises(errors.InvalidRequestError, match="list of input objects"):
        bridge.execute_resource("langchain", rid, {"batch": "nope"})


def test_stream_yields_deltas_in_order_first_chunk_before_the_end(bridge: MLBridge) -> None:
    text = "streamed token by token"
    llm = fake_list([text], sleep=0.05)  # FakeListChatModel sleeps before each character
    rid = bridge.create_resource("langchain", "chain", {"prompt": "{q}", "llm": llm})
    reference = PromptTemplate.from_template("{q}") | FakeListChatModel(responses=[text])
    expected = list((reference | StrOutputParser()).stream({"q": "go"}))
    stream = bridge.stream_resource("langchain", rid, {"q": "go"})
    chunks, first, total = first_chunk_times(stream)
    assert chunks == expected == list(text)
    assert stream.result == text
    # The worker sleeps 0.05 s before each of the 22 later characters: the first chunk must
    # have arrived at least ~1 s before the last one, however loaded the machine.
    assert first >= 0 and total - first > 0.05 * (len(text) - 1) * 0.8


def test_stream_of_generic_fake_chat_model_is_word_by_word_as_in_process(bridge: MLBridge) -> None:
    words = "the quick brown fox jumps"
    config = {"factory": "langchain_helpers:generic_chain", "kwargs": {"messages": [words]}}
    rid = bridge.create_resource("langchain", "chain", config)
    expected = list(generic_chain([words]).stream({"q": "go"}))
    stream = bridge.stream_resource("langchain", rid, {"q": "go"})
    assert list(stream) == expected == ["the", " ", "quick", " ", "brown", " ", "fox", " ", "jumps"]
    assert stream.result == words


def test_stream_of_a_json_chain_yields_partial_objects_then_the_output(bridge: MLBridge) -> None:
    answer = '{"a": 1, "b": [1, 2]}'
    rid = bridge.create_resource(
        "langchain", "chain", {"prompt": "{q}", "llm": fake_list([answer]), "parser": "json"}
    )
    reference = PromptTemplate.from_template("{q}") | FakeListChatModel(responses=[answer])
    expected = list((reference | JsonOutputParser()).stream({"q": "x"}))
    stream = bridge.stream_resource("langchain", rid, {"q": "x"})
    assert list(stream) == expected
    assert stream.result == {"a": 1, "b": [1, 2]}


def test_per_call_config_is_passed_through(bridge: MLBridge) -> None:
    rid = bridge.create_resource("langchain", "chain", {"factory": "langchain_helpers:config_echo"})
    config = {"tags": ["b", "a"], "metadata": {"user": "u1"}, "run_name": "mine"}
    out = bridge.execute_resource("langchain", rid, {"x": 1, "config": config})
    assert out == {"tags": ["a", "b"], "metadata": {"user": "u1"}, "input": {"x": 1}}
    with pytest.raises(errors.InvalidRequestError, match="unknown keys \\['callbacks'\\]"):
        bridge.execute_resource("langchain", rid, {"x": 1, "config": {"callbacks": []}})


AGENT_TURNS = [
    {"content": "", "tool_calls": [tool_call("add", {"a": 20, "b": 22}, "call-1")]},
    "The answer is 42.",
]


def test_agent_calls_a_real_tool_and_returns_output_and_steps(bridge: MLBridge) -> None:
    from langchain.agents import create_agent

    spec = {"class": "langchain_helpers:ToolCallingFakeModel", "kwargs": {"turns": AGENT_TURNS}}
    aid = bridge.create_resource(
        "langchain",
        "agent",
        {"llm": spec, "tools": ["langchain_helpers:add"], "system_prompt": "Use tools."},
    )
    out = bridge.execute_resource("langchain", aid, {"input": "What is 20 + 22?"})
    assert out["output"] == "The answer is 42."
    assert out["steps"] == [{"tool": "add", "args": {"a": 20, "b": 22}, "result": "42"}]
    assert [m["type"] for m in out["messages"]] == ["human", "ai", "tool", "ai"]
    local = create_agent(ToolCallingFakeModel(turns=AGENT_TURNS), [add], system_prompt="Use tools.")
    messages = local.invoke({"messages": [("human", "What is 20 + 22?")]})["messages"]
    assert [m.text for m in messages] == [m["content"] for m in out["messages"]]


def test_an_agent_tool_calls_another_bridge_through_the_host(bridge: MLBridge) -> None:
    turns = [
        {"content": "", "tool_calls": [tool_call("shout_via_echo", {"text": "hey"}, "c1")]},
        "done",
    ]
    spec = {"class": "langchain_helpers:ToolCallingFakeModel", "kwargs": {"turns": turns}}
    aid = bridge.create_resource(
        "langchain", "agent", {"llm": spec, "tools": ["langchain_helpers:shout_via_echo"]}
    )
    stream = bridge.stream_resource("langchain", aid, {"input": "shout hey"})
    chunks = list(stream)
    echo_pid = int(bridge.execute("echo", "pid"))
    step = {"tool": "shout_via_echo", "args": {"text": "hey"}, "result": f"HEY (pid {echo_pid})"}
    assert chunks == [{"step": step}, {"delta": "done"}]
    assert stream.result["steps"] == [step]
    assert stream.result["output"] == "done"
    assert echo_pid not in _pids(bridge)  # the echo bridge's own worker did it


def test_history_is_kept_per_session_and_survives_kill_9(bridge: MLBridge) -> None:
    config = {"prompt": {"messages": [["system", "sys"], ["human", "{q}"]]}, "llm": ECHO_CHAT}
    with bridge.session("langchain") as s, bridge.session("langchain") as other:
        rid = bridge.create_resource("langchain", "chain", {**config, "history": True})
        first = s.execute_resource(rid, {"q": "my name is Ada"})
        assert first == "system:sys | human:my name is Ada"
        second = s.execute_resource(rid, {"q": "what is my name?"})
        assert second == (
            f"system:sys | human:my name is Ada | ai:{first} | human:what is my name?"
        )
        # Another session starts with an empty history.
        assert other.execute_resource(rid, {"q": "hello"}) == "system:sys | human:hello"
        before = _pids(bridge)
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(_pids(bridge)) == 2 and not set(_pids(bridge)) & set(before), 60)
        third = s.execute_resource(rid, {"q": "again?"})
        assert third == f"{second} | ai:{second} | human:again?"
        listed = [r for r in bridge.list_resources("langchain", "chain") if r["resource_id"] == rid]
        assert listed[0]["has_state"] is True


def test_two_sessions_at_once_on_two_workers_both_keep_their_turns(bridge: MLBridge) -> None:
    # Each answer takes 0.5 s, so the two sessions' calls run at the same time, one on each
    # worker; each worker reports its own session's turns, and neither report may drop the
    # other's (the host merges them), on the workers that ran them and after kill -9 of both.
    llm = {"class": "langchain_helpers:EchoChat", "kwargs": {"delay": 0.5}}
    config = {"prompt": {"messages": [["human", "{q}"]]}, "llm": llm, "history": True}
    rid = bridge.create_resource("langchain", "chain", config)
    with (
        bridge.session("langchain") as a,
        bridge.session("langchain") as b,
        ThreadPoolExecutor(2) as pool,
    ):

        def both(turn: int) -> tuple[str, str]:
            fa = pool.submit(a.execute_resource, rid, {"q": f"a{turn}"})
            fb = pool.submit(b.execute_resource, rid, {"q": f"b{turn}"})
            return fa.result(timeout=60), fb.result(timeout=60)

        assert both(0) == ("human:a0", "human:b0")
        assert both(1) == ("human:a0 | ai:human:a0 | human:a1", "human:b0 | ai:human:b0 | human:b1")
        before = _pids(bridge)
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(_pids(bridge)) == 2 and not set(_pids(bridge)) & set(before), 60)
        ra, rb = both(2)
    assert ra.startswith("human:a0 | ai:human:a0 | human:a1 | ai:") and ra.endswith("human:a2")
    assert rb.startswith("human:b0 | ai:human:b0 | human:b1 | ai:") and rb.endswith("human:b2")
    bridge.delete_resource("langchain", rid)


def test_history_keeps_max_history_messages_a_session(bridge: MLBridge) -> None:
    config = {"prompt": {"messages": [["human", "{q}"]]}, "llm": ECHO_CHAT, "history": True}
    with bridge.session("langchain") as s:
        rid = s.create_resource("chain", {**config, "max_history": 4})
        assert s.execute_resource(rid, {"q": "one"}) == "human:one"
        two = s.execute_resource(rid, {"q": "two"})
        assert two == "human:one | ai:human:one | human:two"
        # two turns (4 messages) are kept: all of them reach the model while three runs ...
        three = s.execute_resource(rid, {"q": "three"})
        assert three == f"human:one | ai:human:one | human:two | ai:{two} | human:three"
        # ... and then the oldest turn goes
        four = s.execute_resource(rid, {"q": "four"})
        assert four == f"human:two | ai:{two} | human:three | ai:{three} | human:four"
        with pytest.raises(errors.InvalidConfigurationError, match="max_history must be"):
            s.create_resource("chain", {**config, "max_history": 1})


def test_history_goes_where_the_prompt_places_it(bridge: MLBridge) -> None:
    messages = [["placeholder", "{history}"], ["system", "sys"], ["human", "{q}"]]
    with bridge.session("langchain") as s:
        rid = s.create_resource(
            "chain", {"prompt": {"messages": messages}, "llm": ECHO_CHAT, "history": True}
        )
        first = s.execute_resource(rid, {"q": "one"})
        assert first == "system:sys | human:one"
        second = s.execute_resource(rid, {"q": "two"})
        assert second == f"human:one | ai:{first} | system:sys | human:two"


def test_agent_history_follows_the_session(bridge: MLBridge) -> None:
    turns = ["first answer", "second answer"]
    spec = {"class": "langchain_helpers:ToolCallingFakeModel", "kwargs": {"turns": turns}}
    with bridge.session("langchain") as s:
        aid = s.create_resource("agent", {"llm": spec, "tools": [], "history": True})
        one = s.execute_resource(aid, {"input": "hi"})
        assert [m["type"] for m in one["messages"]] == ["human", "ai"]
        two = s.execute_resource(aid, {"input": "again"})
        assert two["output"] == "second answer"
        assert [m["content"] for m in two["messages"]] == ["again", "second answer"]


def test_stream_closed_early_cancels_the_call_in_the_worker(bridge: MLBridge) -> None:
    llm = fake_list(["x" * 200], sleep=0.05)  # 10 s if it ran to the end
    rid = bridge.create_resource("langchain", "chain", {"prompt": "{q}", "llm": llm})
    pids = _pids(bridge)
    stream = bridge.stream_resource("langchain", rid, {"q": "go"})
    assert next(iter(stream)) == "x"
    stream.close()
    # The worker is free again well before the stream would have ended (10 s), and was not
    # killed: the cancel stopped the chain at its next token.
    workers = lambda: bridge.statistics()["pools"]["langchain"]["workers"]  # noqa: E731
    assert wait_until(lambda: not any(w["busy"] for w in workers()), 5), "still streaming"
    assert isinstance(bridge.execute_resource("langchain", rid, {"q": "quick"}), str)
    assert _pids(bridge) == pids


def test_timeout_cancels_a_running_chain_without_killing_the_worker(bridge: MLBridge) -> None:
    rid = bridge.create_resource(
        "langchain", "chain", {"factory": "langchain_helpers:slow_steps", "kwargs": {"steps": 20}}
    )
    pids = _pids(bridge)
    with pytest.raises(errors.CallTimeoutError):
        bridge.execute_resource("langchain", rid, {"x": 1}, timeout=1.0)
    assert _pids(bridge) == pids  # stopped at its next step, within cancel_grace


@pytest.mark.parametrize(
    ("config", "inputs", "kind", "remote_type", "text"),
    [
        (
            {"prompt": "{q}", "llm": fake_list(["not json at all"]), "parser": "json"},
            {"q": "x"},
            errors.ModelError,
            "OutputParserException",
            "Invalid json output",
        ),
        (
            {
                "prompt": "{q}",
                "llm": fake_list(['{"town": "Rome"}']),
                "parser": {"json_schema": {"type": "object", "required": ["city"]}},
            },
            {"q": "x"},
            errors.ModelError,
            "OutputParserException",
            "'city' is a required property",
        ),
        (
            {"prompt": "{q}", "llm": {"class": "langchain_helpers:FailingChat"}},
            {"q": "x"},
            errors.RateLimitError,
            "RateLimitError",
            "Rate limit reached",
        ),
        (
            {
                "prompt": "{q}",
                "llm": {"class": "langchain_helpers:FailingChat", "kwargs": {"failure": "t"}},
            },
            {"q": "x"},
            errors.CallTimeoutError,
            "APITimeoutError",
            "timed out",
        ),
        (
            {"prompt": "{q} and {r}", "llm": fake_list(["x"])},
            {"q": "x"},
            errors.InvalidRequestError,
            "KeyError",
            "missing variables",
        ),
    ],
    ids=["parser", "json_schema", "rate_limit", "timeout", "missing_variable"],
)
def test_failures_map_to_common_kinds_keeping_type_and_text(
    bridge: MLBridge,
    config: dict[str, Any],
    inputs: dict[str, Any],
    kind: type[Exception],
    remote_type: str,
    text: str,
) -> None:
    rid = bridge.create_resource("langchain", "chain", config)
    with pytest.raises(kind, match=text) as info:
        bridge.execute_resource("langchain", rid, inputs)
    assert getattr(info.value, "remote_type", None) == remote_type


@pytest.mark.parametrize(
    ("config", "text"),
    [
        ({"prompt": "{q}", "factory": "x:y"}, "exactly one of"),
        ({"prompt": "{q}", "parser": "yaml"}, "chain.parser must be"),
        ({"prompt": "{q}", "llm": {"class": "json:dumps"}}, "not a langchain_core BaseChatModel"),
        (
            {"prompt": "{q}", "llm": {"provider": "anthropic", "model": "claude"}},
            "langchain-anthropic",
        ),
        ({"factory": "nowhere_module:f"}, "cannot import module 'nowhere_module'"),
        ({"factory": "langchain_helpers:lc_env"}, "not a LangChain Runnable"),
        ({"prompt": "{q}", "temperature": 1}, "unknown keys \\['temperature'\\]"),
    ],
)
def test_invalid_chain_specs_are_invalid_configuration(
    bridge: MLBridge, config: dict[str, Any], text: str
) -> None:
    with pytest.raises(errors.InvalidConfigurationError, match=text):
        bridge.create_resource("langchain", "chain", config)


def test_api_keys_are_never_returned_or_shown(bridge: MLBridge) -> None:
    secret = "sk-test-SECRET-0123456789"
    llm = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "api_key": secret,
        "base_url": "http://127.0.0.1:9/v1",  # nothing listens: a connection error, at once
        "kwargs": {"max_retries": 0},
    }
    with bridge.session("langchain") as s:  # one worker: the one holding the chain
        rid = s.create_resource("chain", {"prompt": "{q}", "llm": llm})
        with pytest.raises(errors.ModelError) as info:
            s.execute_resource(rid, {"q": "x"})
        assert info.value.remote_type in ("APIConnectionError", "OpenAIConnectionError")
        shown = [
            str(info.value),
            repr(bridge.list_resources("langchain", "chain")),
            repr(s.execute("list_chains")),
            repr(bridge.get_stats("langchain")),
        ]
    assert all(secret not in text for text in shown)
    assert "api_key_set" in shown[2]


def test_a_key_quoted_in_a_provider_error_is_masked_in_text_and_traceback(
    bridge: MLBridge,
) -> None:
    secret = "sk-quoted-SECRET-987654"
    kwargs = {"failure": "leak", "api_key": secret}
    llm = {"class": "langchain_helpers:FailingChat", "kwargs": kwargs}
    rid = bridge.create_resource("langchain", "chain", {"prompt": "{q}", "llm": llm})
    with pytest.raises(errors.RemoteError, match="refused the key \\*\\*\\*") as info:
        bridge.execute_resource("langchain", rid, {"q": "x"})
    assert info.value.remote_type == "RuntimeError"
    assert secret not in str(info.value)
    assert secret not in (info.value.remote_traceback or "")
    assert secret not in repr(bridge.list_resources("langchain", "chain"))
