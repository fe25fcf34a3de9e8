"""Agents for the LangChain bridge: ``langchain.agents.create_agent`` with a real tool loop.

An ``agent`` resource's config: ``{"llm": <model spec>, "tools": ["pkg.mod:tool", ...],
"system_prompt"?: "...", "max_iterations"?: 10, "history"?: false, "max_history"?: 200}``. A
tool is a LangChain ``BaseTool`` (``@tool``) or a plain function (LangChain makes it a tool from
its signature and docstring). The model must support tool calling (``bind_tools``).

Inputs: ``{"input": "text"}`` or ``{"messages": [[role, text] | {role, content}, ...]}``. The
reply: ``{"output": final text, "steps": [{"tool", "args", "result"}], "messages": [...]}`` where
``steps`` pairs each tool call the model made with the tool's result, in order, and ``messages``
are this run's messages (the new human turn onwards) as ``{type, content, ...}``. With
``"history": true`` the run starts from the session's earlier messages and adds its own to them
(at most ``max_history`` messages a session; the oldest turns go first).
"""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

from ..errors import InvalidConfigurationError, InvalidRequestError
from ._langchain_chains import Chain, check_keys, history_options, plain, plain_message
from ._langchain_models import build_model, import_object, normalize_model_spec

__all__ = ["agent_input", "agent_reply", "build_agent"]

_AGENT_KEYS = frozenset(
    {"llm", "tools", "system_prompt", "max_iterations", "history", "max_history"}
)
_ROLE_CLASSES = {"human": "human", "user": "human", "ai": "ai", "assistant": "ai"}


def _bad(message: str) -> InvalidConfigurationError:
    return InvalidConfigurationError(message)


def _tool(path: Any, i: int) -> Any:
    from langchain_core.tools import BaseTool

    obj = import_object(path, f"agent.tools[{i}]")
    if isinstance(obj, BaseTool) or callable(obj):
        return obj
    raise _bad(f"agent.tools[{i}] {path!r} is neither a LangChain tool nor a function")


def build_agent(config: dict[str, Any], state: Any, host: Any, default_llm: Any = None) -> Chain:
    """A :class:`Chain` of kind ``agent`` (validated here; the model is not called); without an
    ``llm`` it uses ``default_llm`` (the bridge's ``llm`` setting), else the local model."""
    check_keys(config, _AGENT_KEYS, "agent")
    tools = config.get("tools", [])
    if not isinstance(tools, list):
        raise _bad("agent.tools must be a list of import paths such as 'pkg.mod:my_tool'")
    system_prompt = config.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise _bad("agent.system_prompt must be a string")
    iterations = config.get("max_iterations", 10)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise _bad(f"agent.max_iterations must be an integer >= 1, got {iterations!r}")
    history, max_history = history_options(config, "agent")
    raw_llm = config["llm"] if "llm" in config else default_llm
    llm = build_model(normalize_model_spec(raw_llm, where="agent.llm"), host)
    built_tools = [_tool(p, i) for i, p in enumerate(tools)]
    if built_tools and type(llm).bind_tools is BaseChatModel.bind_tools:
        raise _bad(
            f"agent.llm {type(llm).__name__} does not support tool calling (bind_tools); "
            "use a chat model that does (e.g. provider 'openai'), or a chain instead"
        )
    try:
        from langchain.agents import create_agent
    except ImportError as exc:
        raise _bad(
            "agents run langchain.agents.create_agent: install the 'langchain' package (with "
            f"langgraph) in the langchain bridge's interpreter ({exc})"
        ) from exc

    try:
        graph = create_agent(llm, built_tools, system_prompt=system_prompt)
    except Exception as exc:
        raise _bad(f"the agent could not be built: {type(exc).__name__}: {exc}") from exc
    names = [getattr(t, "name", getattr(t, "__name__", str(t))) for t in built_tools]
    chain = Chain("agent", graph, config, history, tools=names, max_messages=max_history)
    chain.load_state(state)
    return chain


def recursion_limit(chain: Chain) -> int:
    # Each iteration is a model step and a tools step; one more for the final answer.
    return 2 * int(chain.config.get("max_iterations", 10)) + 1


def agent_input(inputs: dict[str, Any]) -> list[BaseMessage]:
    """The new messages of a run: ``input`` text, or a ``messages`` list."""
    if isinstance(inputs.get("input"), str) and set(inputs) <= {"input"}:
        return [HumanMessage(inputs["input"])]
    raw = inputs.get("messages")
    if not isinstance(raw, list) or set(inputs) - {"messages"}:
        raise InvalidRequestError(
            "agent inputs are {'input': 'text'} or {'messages': [[role, text], ...]}, got keys "
            f"{sorted(inputs)}"
        )
    out: list[BaseMessage] = []
    for i, m in enumerate(raw):
        if isinstance(m, dict) and {"role", "content"} <= set(m):
            role, text = m["role"], m["content"]
        elif isinstance(m, list | tuple) and len(m) == 2:
            role, text = m
        else:
            raise InvalidRequestError(f"agent messages[{i}] must be [role, text], got {m!r}")
        kind = _ROLE_CLASSES.get(role)
        if kind is None or not isinstance(text, str):
            raise InvalidRequestError(
                f"agent messages[{i}]: role must be human/user or ai/assistant, text a string"
            )
        out.append(HumanMessage(text) if kind == "human" else AIMessage(text))
    if not out:
        raise InvalidRequestError("agent messages must not be empty")
    return out


def agent_reply(messages: list[BaseMessage]) -> dict[str, Any]:
    """``{"output", "steps", "messages"}`` from the messages of one run."""
    calls: dict[str, dict[str, Any]] = {}
    steps: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m, AIMessage):
            for c in m.tool_calls:
                step = {"tool": c.get("name"), "args": plain(c.get("args")), "result": None}
                calls[str(c.get("id"))] = step
                steps.append(step)
        elif isinstance(m, ToolMessage):
            found = calls.get(str(m.tool_call_id))
            result = plain(m.content)
            if found is None:
                steps.append({"tool": m.name, "args": None, "result": result})
            else:
                found["result"] = result
    final = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
    return {
        "output": final.text if final is not None else "",
        "steps": steps,
        "messages": [plain_message(m) for m in messages],
    }
