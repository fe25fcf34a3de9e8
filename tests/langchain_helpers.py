"""Fake tools, fake models and chain factories for the LangChain bridge tests.

Importable by the LangChain workers (tests/ is put on their PYTHONPATH by :func:`lc_env`):

* :class:`ToolCallingFakeModel`: LangChain's ``GenericFakeChatModel`` that supports
  ``bind_tools``, scripted from plain data (``turns``: ``{"content", "tool_calls"}``), so
  ``create_agent`` runs a real tool loop against it.
* :class:`SerializableFakeChat`: ``FakeListChatModel`` that ``dumpd`` can serialise.
* :class:`SlowInvokeFakeChat`: ``FakeListChatModel`` that also sleeps in ``invoke``.
* tools: :func:`add` (a ``@tool``), :func:`multiply` (a plain function), :func:`slow_add`
  (records each run in ``$MLBRIDGE_TEST_MARKER``), :func:`shout_via_echo` (calls the ``echo``
  bridge through the host), :func:`embedding_size` (an embedding from the Transformers bridge).
* factories: :func:`upper_chain`, :func:`config_echo`, :func:`slow_steps`, :func:`llm_chain`,
  :func:`generic_chain` (GenericFakeChatModel cannot be built from plain data: its messages are
  an iterator).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import (
    FakeListChatModel,
    GenericFakeChatModel,
    SimpleChatModel,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
from langchain_core.tools import tool
from pydantic import model_validator

TESTS_DIR = Path(__file__).resolve().parent


def lc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for LangChain workers: tests/ importable (for this module)."""
    path = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, **(extra or {})}


def turn_messages(turns: Sequence[Any]) -> list[AIMessage]:
    out = []
    for t in turns:
        if isinstance(t, str):
            out.append(AIMessage(t))
        else:
            out.append(AIMessage(content=t.get("content", ""), tool_calls=t.get("tool_calls", [])))
    return out


class ToolCallingFakeModel(GenericFakeChatModel):
    """A scripted tool-calling model: each call answers the next of ``turns``."""

    @model_validator(mode="before")
    @classmethod
    def _from_turns(cls, data: Any) -> Any:
        if isinstance(data, dict) and "turns" in data:
            data = dict(data)
            data["messages"] = iter(turn_messages(data.pop("turns")))
        return data

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # GenericFakeChatModel drops tool calls when streamed: stream words, then the calls.
        message = self._generate(messages, stop=stop, run_manager=run_manager).generations[0]
        ai = message.message
        assert isinstance(ai, AIMessage)
        for word in re.split(r"(\s)", ai.text):
            if word:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
                if run_manager is not None:
                    run_manager.on_llm_new_token(word, chunk=chunk)
                yield chunk
        if ai.tool_calls:
            calls = [
                {"name": c["name"], "args": json.dumps(c["args"]), "id": c["id"], "index": i}
                for i, c in enumerate(ai.tool_calls)
            ]
            yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=calls))


class SerializableFakeChat(FakeListChatModel):
    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True


class SlowInvokeFakeChat(FakeListChatModel):
    """Sleeps ``sleep`` seconds in ``invoke`` too (FakeListChatModel does), per character when
    streamed."""


class EchoChat(SimpleChatModel):
    """Answers with every message it was sent (``type:text`` joined by `` | ``): shows what a
    chain with history really passes to its model. ``delay``: seconds each answer takes."""

    delay: float = 0.0

    @property
    def _llm_type(self) -> str:
        return "echo-chat"

    def _call(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        if self.delay:
            time.sleep(self.delay)
        return " | ".join(f"{m.type}:{m.text}" for m in messages)


class FailingChat(SimpleChatModel):
    """Raises the provider's own exception: ``rate_limit`` or ``timeout`` (openai's classes), or
    ``leak``: an error quoting its ``api_key``."""

    failure: str = "rate_limit"
    api_key: str = ""

    @property
    def _llm_type(self) -> str:
        return "failing-chat"

    def _call(self, *args: Any, **kwargs: Any) -> str:
        import httpx
        import openai

        if self.failure == "leak":  # a provider error that quotes the key it was given
            raise RuntimeError(f"the provider refused the key {self.api_key}")
        request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
        if self.failure == "rate_limit":
            response = httpx.Response(429, request=request)
            raise openai.RateLimitError(
                "Rate limit reached for requests", response=response, body=None
            )
        raise openai.APITimeoutError(request=request)


def tool_call(name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def slow_add(a: int, b: int) -> int:
    """Add two integers, slowly (one second)."""
    marker = os.environ.get("MLBRIDGE_TEST_MARKER")
    if marker:
        with open(marker, "a") as f:
            f.write("ran\n")
    time.sleep(1.0)
    return a + b


def shout_via_echo(text: str) -> str:
    """Upper-case ``text`` by way of the echo bridge (a call back through the host)."""
    from mlbridge.bridges.langchain import call_bridge

    echoed = call_bridge("echo", "echo", {"text": text})
    return f"{echoed['text'].upper()} (pid {call_bridge('echo', 'pid')})"


def embedding_size(text: str) -> int:
    """The size of ``text``'s embedding, computed by the Transformers bridge (a call-back)."""
    from mlbridge.bridges.langchain import call_bridge

    out = call_bridge("transformers", "embed", {"model": "local:minilm", "texts": [text]})
    return int(out["dims"])


def upper_chain(suffix: str = "") -> Runnable[Any, Any]:
    """A factory chain with no model: ``{"text"}`` -> upper-cased text + suffix."""
    return RunnableLambda(lambda x: x["text"].upper() + suffix)


def config_echo() -> Runnable[Any, Any]:
    """Returns the tags and metadata of the per-call config it ran with."""

    def echo(x: Any, config: RunnableConfig) -> dict[str, Any]:
        md = {k: v for k, v in (config.get("metadata") or {}).items() if not k.startswith("ls_")}
        return {"tags": sorted(config.get("tags") or []), "metadata": md, "input": x}

    return RunnableLambda(echo)


def slow_steps(steps: int = 10, delay_s: float = 0.3) -> Runnable[Any, Any]:
    """``steps`` chained steps of ``delay_s`` each (a long chain to cancel)."""
    marker = os.environ.get("MLBRIDGE_TEST_MARKER")

    def step(x: Any) -> Any:
        if marker:
            with open(marker, "a") as f:
                f.write("step\n")
        time.sleep(delay_s)
        return x

    chain: Runnable[Any, Any] = RunnableLambda(step)
    for _ in range(steps - 1):
        chain = chain | RunnableLambda(step)
    return chain


def llm_chain(llm: Any, system: str = "be brief") -> Runnable[Any, Any]:
    """A factory chain given the spec's ``llm``: system + history + question."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", system), ("placeholder", "{history}"), ("human", "{input}")]
    )
    return prompt | llm | StrOutputParser()


def generic_chain(messages: list[str]) -> Runnable[Any, Any]:
    """prompt | LangChain's GenericFakeChatModel (streams word by word) | str parser."""
    model = GenericFakeChatModel(messages=iter(messages))
    return ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()


def fake_list(responses: list[str], **kwargs: Any) -> dict[str, Any]:
    return {
        "class": "langchain_core.language_models:FakeListChatModel",
        "kwargs": {"responses": responses, **kwargs},
    }


def generic(messages: list[str]) -> dict[str, Any]:
    return {"class": "langchain_helpers:ToolCallingFakeModel", "kwargs": {"turns": messages}}


def first_chunk_times(chunks: Iterator[Any]) -> tuple[list[Any], float, float]:
    """Consume a stream: (chunks, seconds to the first chunk, seconds to the end)."""
    t0 = time.perf_counter()
    got: list[Any] = []
    first = -1.0
    for c in chunks:
        if first < 0:
            first = time.perf_counter() - t0
        got.append(c)
    return got, first, time.perf_counter() - t0
