"""mlbridge's local chat model as a LangChain ``BaseChatModel``: a call back to the host.

:class:`HostChatModel` sends each generation to ``<bridge>:chat`` (default the Transformers
bridge, model ``local:smollm2``) through the worker's host client, so every LangChain worker
shares one model copy and needs no network. ``invoke`` makes one blocking call; ``stream`` uses
the streamed form and turns each ``{"delta": text}`` chunk into an ``AIMessageChunk`` as the
token arrives (and tells the run's callbacks with ``on_llm_new_token``). The enclosing call's
cancel flag is watched by the host client while it waits, so a cancel stops the generation too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import PrivateAttr

from ..errors import CallbackError, ModelError

__all__ = ["HostChatModel", "chat_messages"]

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


def chat_messages(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages -> the ``{"role", "content"}`` list the Transformers bridge takes.

    Tool results and other kinds become user turns (the local model has no tool role)."""
    out: list[dict[str, str]] = []
    for m in messages:
        role = _ROLES.get(m.type, "user")
        out.append({"role": role, "content": m.text})
    return out


def _usage(result: dict[str, Any]) -> dict[str, int]:
    u = result.get("usage") or {}
    prompt = int(u.get("prompt_tokens") or 0)
    completion = int(u.get("completion_tokens") or 0)
    return {
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": int(u.get("total_tokens") or prompt + completion),
    }


class HostChatModel(BaseChatModel):
    """The local model served by another bridge's pool (``<bridge>:chat``) through the host."""

    model: str = "local:smollm2"
    bridge: str = "transformers"
    temperature: float | None = 0.0
    max_tokens: int | None = 128
    timeout: float = 600.0
    _host: Callable[[], Any] | None = PrivateAttr(default=None)

    def set_host(self, host: Callable[[], Any]) -> None:
        self._host = host

    @property
    def _llm_type(self) -> str:
        return "mlbridge-host-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "bridge": self.bridge}

    def _client(self) -> Any:
        client = self._host() if self._host is not None else None
        if client is None or not client.available:
            raise CallbackError(
                f"the local model {self.model!r} is served by the {self.bridge!r} pool through "
                "the mlbridge host, and this worker has no host to call (a standalone worker or "
                "an old host without call-backs): give the chain an 'llm' spec, or run it under "
                "mlbridge"
            )
        return client

    def _args(self, messages: list[BaseMessage], stop: list[str] | None) -> dict[str, Any]:
        args: dict[str, Any] = {"model": self.model, "messages": chat_messages(messages)}
        if self.max_tokens is not None:
            args["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            args["temperature"] = self.temperature
        if stop:
            args["stop"] = list(stop)
        return args

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = self._client().call(
            self.bridge, "chat", self._args(messages, stop), timeout=self.timeout
        )
        if not isinstance(result, dict):
            raise ModelError(f"{self.bridge}:chat returned {type(result).__name__}, not a reply")
        text = (result.get("message") or {}).get("content") or result.get("text") or ""
        message = AIMessage(
            content=text,
            usage_metadata=_usage(result),
            response_metadata={"finish_reason": result.get("finish_reason"), "model": self.model},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        chunks = self._client().stream(
            self.bridge, "chat", self._args(messages, stop), timeout=self.timeout
        )
        final: Any = None
        while True:
            try:
                chunk = next(chunks)
            except StopIteration as stop_it:
                final = stop_it.value
                break
            delta = chunk.get("delta") if isinstance(chunk, dict) else None
            if delta:
                gen = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                if run_manager is not None:
                    run_manager.on_llm_new_token(delta, chunk=gen)
                yield gen
        final = final if isinstance(final, dict) else {}
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=_usage(final),  # type: ignore[arg-type]
                response_metadata={"finish_reason": final.get("finish_reason")},
                chunk_position="last",
            )
        )
