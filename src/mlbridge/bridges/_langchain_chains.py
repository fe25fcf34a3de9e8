"""Chain specs for the LangChain bridge: plain data -> a runnable, plus its chat history.

A ``chain`` resource's config is one of (see the bridge's docstring for the whole shape):

* ``{"prompt": "template {var}" | {"messages": [["system", "..."], ["human", "{question}"]]},
  "llm": <model spec>, "parser": "str" | "json" | {"json_schema": {...}}}``: prompt | model |
  parser (``parser`` defaults to ``"str"``);
* ``{"factory": "pkg.mod:function", "kwargs": {...}}``: whatever Runnable the function returns
  (it is also given ``llm=<the built model>`` when the spec has an ``llm``);
* ``{"serialized": <langchain_core.load.dumpd output>, "valid_namespaces"?: ["mypkg"]}``: revived
  with ``langchain_core.load.load``; classes outside LangChain's own packages must be named by
  their top-level package in ``valid_namespaces``; secrets come from the environment.

Any of them may add ``"history": true``: the chain then keeps chat history per session (in
:attr:`Chain.histories`; after every call the bridge reports the changed session's part of it to
the host as a patch of the resource's state, so it survives a worker restart, follows the session
to any worker, and two sessions running at once on two workers both keep their turns), at most
``max_history`` messages a session (default 200; the oldest turns go first). A prompt chain gets
a ``MessagesPlaceholder("history")`` before its last message (unless its messages already use
``{history}``); a factory or serialized chain receives the messages as its ``history`` input.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, messages_from_dict
from langchain_core.messages import messages_to_dict as _messages_to_dict
from langchain_core.runnables import Runnable

from ..errors import InvalidConfigurationError, InvalidRequestError
from ._langchain_models import build_model, import_object, normalize_model_spec, public_spec

__all__ = [
    "Chain",
    "build_chain",
    "plain",
    "plain_chunk",
    "redacted_config",
]

_CHAIN_KEYS = frozenset(
    {
        "prompt",
        "llm",
        "parser",
        "factory",
        "kwargs",
        "serialized",
        "valid_namespaces",
        "history",
        "max_history",
    }
)
#: messages a session's history keeps unless the config's ``max_history`` says otherwise
DEFAULT_MAX_HISTORY = 200
_ROLES = {"user": "human", "assistant": "ai"}
HostGetter = Callable[[], Any]


def _bad(message: str) -> InvalidConfigurationError:
    return InvalidConfigurationError(message)


@dataclass(slots=True)
class Chain:
    """A built chain or agent: the runnable, how it was made, and its per-session history."""

    kind: str  # "chain" | "agent"
    runnable: Any
    config: dict[str, Any]
    history: bool = False
    histories: dict[str, list[BaseMessage]] = field(default_factory=dict)
    #: inputs -> the human turn to remember (chains with history only)
    human_turn: Callable[[dict[str, Any]], BaseMessage] | None = None
    #: input variables the runnable takes (None when unknown)
    input_names: frozenset[str] | None = None
    tools: list[str] = field(default_factory=list)

    #: the most messages a session's history keeps (oldest turns go first)
    max_messages: int = DEFAULT_MAX_HISTORY

    def messages(self, session: str) -> list[BaseMessage]:
        return list(self.histories.get(session, ()))

    def remember(self, session: str, turns: list[BaseMessage]) -> None:
        kept = self.histories.setdefault(session, [])
        kept.extend(turns)
        if len(kept) > self.max_messages:
            del kept[: len(kept) - self.max_messages]
            # a history starts at a human turn: never with a tool result or an answer alone
            while kept and kept[0].type != "human":
                del kept[0]

    def session_state(self, session: str) -> list[dict[str, Any]]:
        """One session's history as the saved state holds it (``state["history"][session]``)."""
        return _messages_to_dict(self.histories.get(session, []))

    def dump_state(self) -> dict[str, Any]:
        return {"history": {s: _messages_to_dict(m) for s, m in self.histories.items()}}

    def load_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        saved = state.get("history")
        if isinstance(saved, dict):
            self.histories = {str(s): messages_from_dict(m) for s, m in saved.items()}

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": redacted_config(self.config),
            "kind": self.kind,
            "history": self.history,
            "sessions_with_history": sorted(self.histories),
        }
        if self.input_names is not None:
            out["input_variables"] = sorted(self.input_names)
        if self.tools:
            out["tools"] = list(self.tools)
        return out


def redacted_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as replies show it: every secret-looking value masked, the model spec as
    :func:`public_spec` shows it (``api_key_set`` instead of the key)."""
    from .._redact import redact

    out: dict[str, Any] = redact(config)
    if isinstance(config.get("llm"), dict):
        out["llm"] = redact(public_spec(config["llm"]))
    return out


def check_keys(config: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise _bad(f"{what} config: unknown keys {unknown}; allowed: {sorted(allowed)}")


def build_chain(
    config: dict[str, Any], state: Any, host: HostGetter, default_llm: Any = None
) -> Chain:
    """A :class:`Chain` for a ``chain`` resource config (validated here; nothing is called).

    ``default_llm`` (the bridge's ``llm`` setting) is the model of a prompt chain without one;
    with neither, the local model."""
    check_keys(config, _CHAIN_KEYS, "chain")
    kinds = [k for k in ("prompt", "factory", "serialized") if k in config]
    if len(kinds) != 1:
        raise _bad(
            "a chain config needs exactly one of 'prompt' (with 'llm' and 'parser'), 'factory' "
            f"('pkg.mod:function') or 'serialized' (langchain_core.load.dumpd output); got {kinds}"
        )
    history, max_history = history_options(config, "chain")
    if kinds[0] == "prompt":
        chain = _prompt_chain(config, host, history, default_llm)
    else:
        runnable = _factory(config, host) if kinds[0] == "factory" else _serialized(config)
        names = _input_names(runnable)
        chain = Chain("chain", runnable, config, history, input_names=names)
        if history:
            chain.human_turn = _human_from_inputs
    chain.max_messages = max_history
    chain.load_state(state)
    return chain


def history_options(config: dict[str, Any], what: str) -> tuple[bool, int]:
    """``history`` (bool) and ``max_history`` (messages kept per session, >= 2) of a config."""
    history = config.get("history", False)
    if not isinstance(history, bool):
        raise _bad(f"{what}.history must be true or false, got {history!r}")
    limit = config.get("max_history", DEFAULT_MAX_HISTORY)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
        raise _bad(
            f"{what}.max_history must be an integer >= 2 (messages kept per session), got {limit!r}"
        )
    return history, limit


def _human_from_inputs(inputs: dict[str, Any]) -> BaseMessage:
    """The human turn of a factory/serialized chain: ``input``, the only text input, or JSON."""
    if isinstance(inputs.get("input"), str):
        return HumanMessage(inputs["input"])
    texts = [v for k, v in inputs.items() if k != "history" and isinstance(v, str)]
    if len(texts) == 1 and len(inputs) == 1:
        return HumanMessage(texts[0])
    return HumanMessage(json.dumps(plain(inputs), sort_keys=True, default=str))


def _input_names(runnable: Any) -> frozenset[str] | None:
    try:
        schema = runnable.get_input_jsonschema()
    except Exception:
        return None
    props = schema.get("properties") if isinstance(schema, dict) else None
    return frozenset(props) if isinstance(props, dict) else None


def _prompt_chain(
    config: dict[str, Any], host: HostGetter, history: bool, default_llm: Any
) -> Chain:
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder, PromptTemplate

    raw = config["prompt"]
    if isinstance(raw, str):
        if history:
            prompt: Any = ChatPromptTemplate.from_messages([("human", raw)])
        else:
            prompt = PromptTemplate.from_template(raw)
    elif isinstance(raw, dict) and set(raw) == {"messages"}:
        prompt = ChatPromptTemplate.from_messages(_message_templates(raw["messages"]))
    else:
        raise _bad(
            "chain.prompt must be a template string such as 'Answer: {question}' or "
            "{'messages': [['system', '...'], ['human', '{question}']]}"
        )
    uses = {*prompt.input_variables, *getattr(prompt, "optional_variables", ())}
    if history and "history" not in uses:
        last = len(prompt.messages) - 1
        prompt = ChatPromptTemplate.from_messages(
            [
                *prompt.messages[:last],
                MessagesPlaceholder("history"),
                prompt.messages[last],
            ]
        )
    raw_llm = config["llm"] if "llm" in config else default_llm
    llm = build_model(normalize_model_spec(raw_llm, where="chain.llm"), host)
    parser = make_parser(config.get("parser", "str"), prompt)
    runnable = prompt | llm | parser
    names = frozenset(prompt.input_variables) - {"history"}
    chain = Chain("chain", runnable, config, history, input_names=names)
    if history:
        template = prompt.messages[-1]

        def human(inputs: dict[str, Any]) -> BaseMessage:
            turns = template.format_messages(**inputs)
            return turns[-1] if turns else HumanMessage("")

        chain.human_turn = human
    return chain


def _message_templates(messages: Any) -> list[Any]:
    if not isinstance(messages, list) or not messages:
        raise _bad("chain.prompt.messages must be a non-empty list of [role, template] pairs")
    out: list[Any] = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and {"role", "content"} <= set(m):
            role, text = m["role"], m["content"]
        elif isinstance(m, list | tuple) and len(m) == 2:
            role, text = m
        else:
            raise _bad(
                f"chain.prompt.messages[{i}] must be [role, template] or {{role, content}}, "
                f"got {m!r}"
            )
        role = _ROLES.get(role, role)
        if role not in ("system", "human", "ai", "placeholder") or not isinstance(text, str):
            raise _bad(
                f"chain.prompt.messages[{i}]: role must be system, human (user), ai (assistant) "
                f"or placeholder, and the template a string; got {m!r}"
            )
        out.append((role, text))
    return out


def make_parser(raw: Any, prompt: Any = None) -> Any:
    """``"str"`` | ``"json"`` | ``{"json_schema": {...}}`` -> an output parser."""
    from langchain_core.output_parsers import JsonOutputParser, StrOutputParser

    if raw == "str":
        return StrOutputParser()
    if raw == "json":
        return JsonOutputParser()
    schema = raw.get("json_schema") if isinstance(raw, dict) and len(raw) == 1 else None
    if isinstance(schema, dict):
        from ._langchain_schema import SchemaJsonParser

        return SchemaJsonParser(json_schema=schema)
    raise _bad(f"chain.parser must be 'str', 'json' or {{'json_schema': {{...}}}}, got {raw!r}")


def _factory(config: dict[str, Any], host: HostGetter) -> Any:
    fn = import_object(config["factory"], "chain.factory")
    if not callable(fn):
        raise _bad(f"chain.factory {config['factory']!r} is not callable")
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise _bad("chain.kwargs must be an object of keyword arguments for the factory")
    if "llm" in config:
        llm = build_model(normalize_model_spec(config["llm"], where="chain.llm"), host)
        kwargs = {**kwargs, "llm": llm}
    try:
        runnable = fn(**kwargs)
    except InvalidConfigurationError:
        raise
    except Exception as exc:
        raise _bad(
            f"chain.factory {config['factory']!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(runnable, Runnable):
        raise _bad(
            f"chain.factory {config['factory']!r} returned {type(runnable).__name__}, "
            "not a LangChain Runnable"
        )
    return runnable


def _serialized(config: dict[str, Any]) -> Any:
    from langchain_core.load import load

    data = config["serialized"]
    if not isinstance(data, dict) or data.get("lc") != 1:
        raise _bad(
            "chain.serialized must be the output of langchain_core.load.dumpd(runnable) "
            '(an object with "lc": 1)'
        )
    namespaces = config.get("valid_namespaces", [])
    if not isinstance(namespaces, list) or not all(isinstance(n, str) for n in namespaces):
        raise _bad("chain.valid_namespaces must be a list of top-level package names")
    extra = {ident: ident for ident in _constructor_ids(data) if ident[0] in namespaces}
    try:
        runnable = load(
            data,
            allowed_objects="all",
            valid_namespaces=list(namespaces),
            secrets_from_env=True,
            additional_import_mappings=extra or None,
        )
    except Exception as exc:
        raise _bad(f"chain.serialized could not be loaded: {type(exc).__name__}: {exc}") from exc
    if not isinstance(runnable, Runnable):
        raise _bad(f"chain.serialized is a {type(runnable).__name__}, not a Runnable")
    return runnable


def _constructor_ids(data: Any) -> Iterator[tuple[str, ...]]:
    if isinstance(data, dict):
        ident = data.get("id")
        if data.get("type") == "constructor" and isinstance(ident, list) and ident:
            yield tuple(str(p) for p in ident)
        for value in data.values():
            yield from _constructor_ids(value)
    elif isinstance(data, list):
        for value in data:
            yield from _constructor_ids(value)


# --------------------------------------------------------------------------- outputs
def plain_message(m: BaseMessage) -> dict[str, Any]:
    kind = m.type[: -len("MessageChunk")].lower() if m.type.endswith("MessageChunk") else m.type
    out: dict[str, Any] = {"type": kind, "content": plain(m.content)}
    tool_calls = getattr(m, "tool_calls", None)
    if tool_calls:
        out["tool_calls"] = [
            {"name": c.get("name"), "args": plain(c.get("args")), "id": c.get("id")}
            for c in tool_calls
        ]
    for key in ("tool_call_id", "name"):
        value = getattr(m, key, None)
        if value:
            out[key] = value
    return out


def plain(value: Any) -> Any:
    """A chain's output as wire data: messages as ``{type, content, ...}``, models dumped."""
    if value is None or isinstance(value, str | int | float | bool | bytes):
        return value
    if isinstance(value, BaseMessage):
        return plain_message(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return plain(dump())
    to_string = getattr(value, "to_string", None)  # a PromptValue
    if callable(to_string):
        return to_string()
    return str(value)


def plain_chunk(chunk: Any) -> Any:
    """A streamed chunk as wire data: message chunks as their text delta."""
    if isinstance(chunk, BaseMessage):
        return chunk.text
    return plain(chunk)


def add_chunks(final: Any, chunk: Any) -> Any:
    """Aggregate streamed chunks as LangChain does (``+``, else the latest chunk wins)."""
    if final is None:
        return chunk
    try:
        return final + chunk
    except TypeError:
        return chunk


def ai_turn(output: Any) -> BaseMessage:
    """The AI turn to remember for a chain's output."""
    if isinstance(output, BaseMessage):
        return AIMessage(content=output.content)
    if isinstance(output, str):
        return AIMessage(output)
    return AIMessage(json.dumps(plain(output), sort_keys=True, default=str))


def check_inputs(inputs: Any, where: str) -> dict[str, Any]:
    if not isinstance(inputs, dict):
        raise InvalidRequestError(f"{where}: inputs must be an object of the chain's variables")
    return inputs
