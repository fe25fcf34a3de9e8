"""The ``langchain`` bridge: LangChain chains, prompts, tools, agents, memory and streaming.

Resources (host-owned: the host records the config, and every worker can rebuild them)::

    create_resource("langchain", "chain", {"prompt": "Answer briefly: {question}",
                                           "llm": <model spec>, "parser": "str"})
    execute_resource("langchain", rid, {"question": "..."})          -> the chain's output
    execute_resource("langchain", rid, {"batch": [{...}, {...}]})     -> [output, ...] (batch)
    stream_resource("langchain", rid, {...})  -> string deltas (for string outputs), then the output
    execute_resource("langchain", rid, {..., "config": {"tags": [...], "metadata": {...},
                                                        "run_name": "..."}})  (passed through)

    create_resource("langchain", "agent", {"llm": <spec>, "tools": ["pkg.mod:tool"],
                                           "system_prompt": "..."})
    execute_resource("langchain", aid, {"input": "..."})
      -> {"output": final text, "steps": [{"tool", "args", "result"}], "messages": [...]}

Chain configs (prompt / factory / serialized, parsers, ``history``) are described in
:mod:`._langchain_chains`, model specs (provider, class, the local default) in
:mod:`._langchain_models`, agents in :mod:`._langchain_agents`.

Memory: a chain or agent created with ``"history": true`` keeps chat history per session (the
call's session id; calls without one share the ``""`` history; ``max_history`` messages at most).
After each call the session's history is reported to the host as a patch of the resource's state,
so the host owns it: a replacement worker after a crash, or any other worker the session's call
lands on, rebuilds the resource with it, and calls of other sessions on other workers meanwhile
lose nothing.

Tools calling other bridges: inside a tool (or any runnable), :func:`call_bridge` and
:func:`stream_bridge` call another bridge through the host, e.g.
``call_bridge("transformers", "embed", {"texts": [...]})``.

Errors: output-parser failures, rate limits, timeouts and invalid specs map to the common kinds,
keeping the original type and text (:mod:`._langchain_errors`); API keys are masked in messages
and never returned (configs are shown redacted). Cancel: a ``cancel`` stops a running chain or
agent at its next chain, model, token or tool event, and a stream at the next chunk.

Settings: ``llm`` (the model spec of prompt chains and agents that give none; default the local
model), ``log_level``. LangChain is imported only in ``_initialize_framework``.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from .._redact import secret_values
from ..errors import CallbackError, InvalidRequestError
from ._logs import setup_bridge_logging
from .base import BaseBridge, ResourceRecord, ResourceType

if TYPE_CHECKING:
    from ._langchain_chains import Chain

__all__ = ["LangChainBridge", "call_bridge", "stream_bridge"]

logger = logging.getLogger("mlbridge.bridge.langchain")
_CONFIG_KEYS = frozenset(
    {"tags", "metadata", "run_name", "max_concurrency", "recursion_limit", "configurable"}
)
_ACTIVE: list[LangChainBridge] = []  # the bridge of this worker process (tools call through it)


def _host_client() -> Any:
    bridge = _ACTIVE[-1] if _ACTIVE else None
    host = bridge.host if bridge is not None else None
    if host is None or not host.available:
        raise CallbackError(
            "call_bridge needs a LangChain worker run by the mlbridge host (it calls the other "
            "bridge through it); this process has none"
        )
    return host


def call_bridge(
    bridge: str, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
) -> Any:
    """From a tool or runnable inside a LangChain worker: run ``command`` on ``bridge`` through
    the host and return its result (blocking)."""
    return _host_client().call(bridge, command, args, timeout=timeout)


def stream_bridge(
    bridge: str, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
) -> Generator[Any, None, Any]:
    """Like :func:`call_bridge`, streamed: yields the chunks, returns the final result."""
    return _host_client().stream(bridge, command, args, timeout=timeout)  # type: ignore[no-any-return]


class LangChainBridge(BaseBridge):
    name = "langchain"

    # ------------------------------------------------------------------ set-up
    def _initialize_framework(self) -> None:
        setup_bridge_logging(logger, self.settings.get("log_level"), "WARNING")
        import langchain_core

        from . import _langchain_agents, _langchain_chains, _langchain_errors, _langchain_models

        self._lc_version = langchain_core.__version__
        self._chains = _langchain_chains
        self._agents = _langchain_agents
        self._errors = _langchain_errors
        self._models = _langchain_models
        self._cancel_handler = _langchain_errors.CancelHandler(self._cancelled)
        raw = self.settings.get("llm")
        self._default_llm = (
            None
            if raw is None
            else _langchain_models.normalize_model_spec(raw, where="settings.llm")
        )
        _ACTIVE.append(self)
        logger.info("langchain-core %s ready", self._lc_version)

    def get_framework_info(self) -> dict[str, Any]:
        return {
            "name": "langchain",
            "version": self._lc_version,
            "resource_types": ["chain", "agent"],
            "parsers": ["str", "json", "json_schema"],
            "default_llm": self._models.public_spec(self._default_llm)
            or {"provider": "mlbridge", "model": "local:smollm2"},
            "capabilities": ["chains", "agents", "tools", "streaming", "batch", "history"],
        }

    def ping_info(self) -> dict[str, Any]:
        return {"langchain_available": True}

    def _register_handlers(self) -> None:
        for kind, create in (("chain", self._make_chain), ("agent", self._make_agent)):
            self.register_resource_type(
                ResourceType(
                    kind,
                    create=create,
                    execute=self._execute,
                    stream=self._stream,
                    describe=lambda c: c.describe(),
                )
            )

    def _host_getter(self) -> Any:
        return self.host

    # ------------------------------------------------------------------ building
    def _cancelled(self) -> bool:
        call = self._call
        return call is not None and call.cancelled

    def _guard(self, what: str, config: dict[str, Any] | None = None) -> Any:
        call = self._call
        where = f"call {call.id} ({call.command}) on {what}" if call is not None else what
        secrets = secret_values(config) if config else []
        return self._errors.translating(where, lambda: secrets)

    def _make_chain(self, config: dict[str, Any], state: Any) -> Chain:
        with self._guard("the chain", config):
            return self._chains.build_chain(config, state, self._host_getter, self._default_llm)

    def _make_agent(self, config: dict[str, Any], state: Any) -> Chain:
        with self._guard("the agent", config):
            return self._agents.build_agent(config, state, self._host_getter, self._default_llm)

    def _executed(self, rec: ResourceRecord, rtype: ResourceType) -> None:
        super()._executed(rec, rtype)
        chain: Chain = rec.obj
        if chain.history and self._call is not None:
            # The host owns the history: it merges this session's part into its record and
            # rebuilds other copies with it (other sessions' turns, saved meanwhile by other
            # workers, stay as they are).
            session = self._session()
            self.patch_resource_state(rec.id, ["history", session], chain.session_state(session))

    # ------------------------------------------------------------------ calls
    def _split(self, chain: Chain, inputs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """``inputs`` without the per-call ``config``, and the RunnableConfig to run with."""
        names = chain.input_names or frozenset()
        user: Any = {}
        if "config" in inputs and "config" not in names:
            inputs = dict(inputs)
            user = inputs.pop("config")
            if not isinstance(user, dict):
                raise InvalidRequestError(
                    "'config' must be an object such as {'tags': [...], 'metadata': {...}, "
                    f"'run_name': '...'}}, got {type(user).__name__}"
                )
            unknown = sorted(set(user) - _CONFIG_KEYS)
            if unknown:
                raise InvalidRequestError(
                    f"'config': unknown keys {unknown}; allowed: {sorted(_CONFIG_KEYS)}"
                )
        config: dict[str, Any] = {"callbacks": [self._cancel_handler], **user}
        if chain.kind == "agent":
            config.setdefault("recursion_limit", self._agents.recursion_limit(chain))
        return inputs, config

    def _session(self) -> str:
        call = self._call
        return (call.session_id or "") if call is not None else ""

    def _is_batch(self, chain: Chain, inputs: dict[str, Any]) -> bool:
        names = chain.input_names or frozenset()
        return "batch" in inputs and len(inputs) == 1 and "batch" not in names

    def _execute(self, chain: Chain, inputs: dict[str, Any]) -> Any:
        inputs, config = self._split(chain, inputs)
        if self._is_batch(chain, inputs):
            return self._batch(chain, inputs["batch"], config)
        if chain.kind == "agent":
            return self._run_agent(chain, inputs, config)
        with self._guard("the chain", chain.config):
            full, session = self._with_history(chain, inputs)
            output = chain.runnable.invoke(full, config)
        self._remember(chain, session, inputs, output)
        self.check_cancelled()
        return self._chains.plain(output)

    def _stream(self, chain: Chain, inputs: dict[str, Any]) -> Generator[Any, None, Any]:
        inputs, config = self._split(chain, inputs)
        if self._is_batch(chain, inputs):
            raise InvalidRequestError("a batch cannot be streamed; send its items one by one")
        if chain.kind == "agent":
            return (yield from self._stream_agent(chain, inputs, config))
        c = self._chains
        final: Any = None
        with self._guard("the chain", chain.config):
            full, session = self._with_history(chain, inputs)
            for chunk in chain.runnable.stream(full, config):
                final = c.add_chunks(final, chunk)
                piece = c.plain_chunk(chunk)
                if piece != "":  # e.g. a model's closing usage chunk: no text to send
                    yield piece
        self.check_cancelled()
        self._remember(chain, session, inputs, final)
        return c.plain(final)

    def _batch(self, chain: Chain, items: Any, config: dict[str, Any]) -> list[Any]:
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise InvalidRequestError("'batch' must be a list of input objects")
        if chain.history:
            raise InvalidRequestError(
                "a chain with history cannot run a batch (the turns would have no order); "
                "send the items one by one"
            )
        if chain.kind == "agent":
            return [self._run_agent(chain, item, config) for item in items]
        with self._guard("the chain", chain.config):
            outputs = chain.runnable.batch(items, config)
        self.check_cancelled()
        return [self._chains.plain(o) for o in outputs]

    # ------------------------------------------------------------------ history
    def _with_history(self, chain: Chain, inputs: dict[str, Any]) -> tuple[dict[str, Any], str]:
        self._chains.check_inputs(inputs, "execute_resource")
        session = self._session()
        if not chain.history:
            return inputs, session
        return {**inputs, "history": chain.messages(session)}, session

    def _remember(self, chain: Chain, session: str, inputs: dict[str, Any], output: Any) -> None:
        if chain.history and chain.human_turn is not None:
            human = chain.human_turn(inputs)
            chain.remember(session, [human, self._chains.ai_turn(output)])

    # ------------------------------------------------------------------ agents
    def _agent_state(self, chain: Chain, inputs: dict[str, Any]) -> tuple[Any, int, str]:
        new = self._agents.agent_input(inputs)
        session = self._session()
        prior = chain.messages(session) if chain.history else []
        return {"messages": [*prior, *new]}, len(prior), session

    def _run_agent(self, chain: Chain, inputs: dict[str, Any], config: dict[str, Any]) -> Any:
        state, start, session = self._agent_state(chain, inputs)
        with self._guard("the agent", chain.config):
            result = chain.runnable.invoke(state, config)
        self.check_cancelled()
        return self._agent_done(chain, session, list(result["messages"])[start:])

    def _agent_done(self, chain: Chain, session: str, messages: list[Any]) -> dict[str, Any]:
        if chain.history:
            chain.remember(session, messages)
        return self._agents.agent_reply(messages)

    def _stream_agent(
        self, chain: Chain, inputs: dict[str, Any], config: dict[str, Any]
    ) -> Generator[Any, None, Any]:
        """``{"delta": text}`` as the model writes, ``{"step": {tool, args, result}}`` as each
        tool returns; then the same reply as ``execute_resource``."""
        from langchain_core.messages import AIMessageChunk, ToolMessage

        state, start, session = self._agent_state(chain, inputs)
        final: Any = None
        args_by_id: dict[str, Any] = {}
        with self._guard("the agent", chain.config):
            for mode, data in chain.runnable.stream(
                state, config, stream_mode=["messages", "values"]
            ):
                if mode == "values":
                    final = data
                    for m in data.get("messages", [])[start:]:
                        for c in getattr(m, "tool_calls", None) or []:
                            args_by_id[str(c.get("id"))] = c.get("args")
                    continue
                message = data[0]
                if isinstance(message, AIMessageChunk) and message.text:
                    yield {"delta": message.text}
                elif isinstance(message, ToolMessage):
                    args = self._chains.plain(args_by_id.get(str(message.tool_call_id)))
                    result = self._chains.plain(message.content)
                    yield {"step": {"tool": message.name, "args": args, "result": result}}
        self.check_cancelled()
        messages = list((final or {}).get("messages", []))[start:]
        return self._agent_done(chain, session, messages)

    def cleanup(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"status": "cleaned", "resources_removed": self.run_cleanup()}

    def shutdown(self) -> None:
        super().shutdown()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
