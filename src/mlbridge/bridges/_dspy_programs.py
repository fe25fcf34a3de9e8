"""DSPy programs for the bridge: build from a config, run, stream, save and restore.

A program's *config* (plain data, recorded by the host) says what to build::

    {"signature": "question -> answer" | {inputs: [...], outputs: [...]},
     "instructions"?: str,
     "program_type": "predict" | "chain_of_thought" | "react",   # or
     "module": "pkg.mod:Class", "module_kwargs"?: {...},         # a user dspy.Module subclass
     "tools"?: ["pkg.mod:function", ...], "max_iters"?: int,     # react
     "lm"?: {...LM spec...}, "adapter"?: "chat" | "json" | "xml",
     "load_from"?: "path/to/saved.json"}

and its *state* (``dump_state()``, e.g. the demos an optimiser chose) is what changes later. Any
worker rebuilds the same program from ``(config, state)``; nothing here keeps a process-local
reference that a rebuild would lose. LMs are never attached to the program's predictors: they are
applied per call with ``dspy.context`` (the program's own ``lm``, else the bridge-wide one), so
the saved state holds no LM and no secret.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from ..errors import InvalidConfigurationError, InvalidRequestError
from ._dspy_lm import HostGetter, build_lm, import_object, normalize_spec, public_spec
from ._dspy_signatures import build_signature, describe_signature

__all__ = [
    "SAVE_FORMAT",
    "CancelCallback",
    "Cancelled",
    "Program",
    "load_file",
    "make_program",
    "plain",
    "run_program",
    "save_file",
    "stream_program",
]

SAVE_FORMAT = "mlbridge.dspy.program"
PROGRAM_TYPES = {
    "predict": "predict",
    "Predict": "predict",
    "chain_of_thought": "chain_of_thought",
    "cot": "chain_of_thought",
    "ChainOfThought": "chain_of_thought",
    "react": "react",
    "ReAct": "react",
}
ADAPTERS = {"chat": "ChatAdapter", "json": "JSONAdapter", "xml": "XMLAdapter"}
CONFIG_KEYS = frozenset(
    {
        "signature",
        "instructions",
        "program_type",
        "module",
        "module_kwargs",
        "tools",
        "max_iters",
        "lm",
        "adapter",
        "load_from",
        "name",
        "description",
    }
)


def _bad(message: str) -> InvalidConfigurationError:
    return InvalidConfigurationError(message)


class Cancelled(BaseException):
    """Raised into a running program at its next LM call once the call is cancelled.

    A ``BaseException`` on purpose: DSPy runs callbacks, tools and adapter fallbacks under
    ``except Exception``, which would swallow an ordinary exception. The bridge turns it into
    :class:`~mlbridge.errors.CancelledCallError` at its boundary.
    """


class CancelCallback(BaseCallback):  # type: ignore[misc]  # dspy ships no type information
    """Checks the current call's cancel flag before every LM call DSPy makes."""

    def __init__(self, cancelled: Callable[[], bool]) -> None:
        super().__init__()
        self._cancelled = cancelled

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if self._cancelled():
            raise Cancelled("cancelled")


@dataclass(slots=True)
class Program:
    """One live program: the DSPy module plus what it was built from."""

    config: dict[str, Any]
    module: Any
    program_type: str
    signature: Any | None = None
    lm_spec: dict[str, Any] | None = None
    lm: Any | None = None
    adapter_name: str | None = None
    adapter: Any | None = None
    tools: list[str] = field(default_factory=list)
    optimization: dict[str, Any] | None = None

    def input_names(self) -> list[str] | None:
        return list(self.signature.input_fields) if self.signature is not None else None

    def output_names(self) -> list[str] | None:
        return list(self.signature.output_fields) if self.signature is not None else None

    def dump_state(self) -> dict[str, Any]:
        return {"module": self.module.dump_state(), "optimization": self.optimization}

    def load_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise _bad(f"program state must be an object, got {type(state).__name__}")
        module_state = state.get("module", state)
        try:
            self.module.load_state(module_state)
        except Exception as exc:
            raise _bad(f"cannot load the saved program state: {exc}") from exc
        info = state.get("optimization")
        self.optimization = info if isinstance(info, dict) else self.optimization

    def demos_count(self) -> int:
        return sum(len(getattr(p, "demos", []) or []) for _, p in self.module.named_predictors())

    def describe(self) -> dict[str, Any]:
        return {
            "program_type": self.program_type,
            "signature": describe_signature(self.signature) if self.signature else None,
            "module": self.config.get("module"),
            "tools": list(self.tools),
            "lm": public_spec(self.lm_spec),
            "adapter": self.adapter_name,
            "demos": self.demos_count(),
            "optimization": self.optimization,
            "config": redacted_config(self.config),
        }


def redacted_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with the LM's secrets removed (for replies, listings and saved files)."""
    out = dict(config)
    lm = out.get("lm")
    if isinstance(lm, dict):
        out["lm"] = public_spec(lm)
    return out


def _adapter(name: Any) -> tuple[str | None, Any | None]:
    if name is None:
        return None, None
    if name not in ADAPTERS:
        raise _bad(f"adapter must be one of {sorted(ADAPTERS)}, got {name!r}")
    return str(name), getattr(dspy, ADAPTERS[name])()


def _tools(paths: Any) -> tuple[list[str], list[Any]]:
    if paths is None:
        return [], []
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise _bad("tools must be a list of import paths such as ['pkg.mod:search']")
    funcs = []
    for p in paths:
        fn = import_object(p, "tool")
        if not callable(fn):
            raise _bad(f"tool {p!r} is not callable")
        funcs.append(fn)
    return list(paths), funcs


def make_program(config: dict[str, Any], state: Any, host: HostGetter) -> Program:
    """Build a program from its config (and saved state). Raises InvalidConfigurationError."""
    if not isinstance(config, dict):
        raise _bad(f"program config must be an object, got {type(config).__name__}")
    if config.get("load_from") is not None:
        saved_config, saved_state = load_file(config["load_from"])
        merged = {**saved_config, **{k: v for k, v in config.items() if k != "load_from"}}
        prog = make_program(merged, saved_state if state is None else state, host)
        prog.config = dict(config)
        return prog
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise _bad(
            f"unknown program config keys {unknown}; known keys: {', '.join(sorted(CONFIG_KEYS))}"
        )
    module_path = config.get("module")
    raw_type = config.get("program_type")
    signature = None
    if config.get("signature") is not None:
        signature = build_signature(config["signature"], config.get("instructions"))
    elif module_path is None:
        raise _bad("a program needs a 'signature' (e.g. 'question -> answer') or a 'module'")
    tool_paths, tools = _tools(config.get("tools"))
    if module_path is not None:
        if raw_type not in (None, "module", "custom"):
            raise _bad("give either 'module' (a dspy.Module subclass) or 'program_type', not both")
        module = _user_module(module_path, config.get("module_kwargs"))
        program_type = "module"
    else:
        program_type = PROGRAM_TYPES.get(raw_type or "predict", "")
        if not program_type:
            raise _bad(
                f"program_type must be one of predict, chain_of_thought, react, got {raw_type!r}"
            )
        if tools and program_type != "react":
            raise _bad("tools are used by program_type 'react'; this program is " + program_type)
        module = _builtin_module(program_type, signature, tools, config.get("max_iters"))
    lm_spec = normalize_spec(config["lm"], where="lm") if config.get("lm") is not None else None
    adapter_name, adapter = _adapter(config.get("adapter"))
    prog = Program(
        config=dict(config),
        module=module,
        program_type=program_type,
        signature=signature,
        lm_spec=lm_spec,
        lm=build_lm(lm_spec, host) if lm_spec is not None else None,
        adapter_name=adapter_name,
        adapter=adapter,
        tools=tool_paths,
    )
    if state is not None:
        prog.load_state(state)
    return prog


def _builtin_module(kind: str, signature: Any, tools: list[Any], max_iters: Any) -> Any:
    if kind == "predict":
        return dspy.Predict(signature)
    if kind == "chain_of_thought":
        return dspy.ChainOfThought(signature)
    if not tools:
        raise _bad("a react program needs 'tools': import paths of functions, e.g. ['pkg.mod:add']")
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int)):
        raise _bad(f"max_iters must be an integer, got {max_iters!r}")
    return dspy.ReAct(signature, tools=tools, max_iters=max_iters or 10)


def _user_module(path: str, kwargs: Any) -> Any:
    cls = import_object(path, "module")
    if not (isinstance(cls, type) and issubclass(cls, dspy.Module)):
        raise _bad(f"module {path!r} is not a dspy.Module subclass")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _bad("module_kwargs must be an object")
    try:
        return cls(**(kwargs or {}))
    except Exception as exc:
        raise _bad(f"module {path!r} could not be built: {exc}") from exc


# --------------------------------------------------------------------------- running
def _inputs(prog: Program, inputs: dict[str, Any]) -> dict[str, Any]:
    names = prog.input_names()
    if names is None or prog.program_type == "module":
        return inputs
    missing = [n for n in names if n not in inputs]
    extra = sorted(set(inputs) - set(names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise InvalidRequestError(
            f"inputs do not match the signature ({'; '.join(parts)}): this program takes {names}"
        )
    return inputs


def plain(value: Any) -> Any:
    """A value the wire can carry (pydantic models dumped, tuples/sets as lists)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return plain(dump(mode="json"))
    to_dict = getattr(value, "toDict", None)
    if callable(to_dict):
        return plain(to_dict())
    return str(value)


def outputs_of(pred: Any) -> dict[str, Any]:
    if isinstance(pred, dspy.Prediction):
        return {k: plain(v) for k, v in pred.toDict().items()}
    if isinstance(pred, dict):
        return {str(k): plain(v) for k, v in pred.items()}
    return {"output": plain(pred)}


def usage_of(pred: Any) -> dict[str, int]:
    total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    get = getattr(pred, "get_lm_usage", None)
    usage = get() if callable(get) else None
    for per_model in (usage or {}).values():
        for key in total:
            value = per_model.get(key) if isinstance(per_model, dict) else None
            if isinstance(value, int):
                total[key] += value
    return total


def _context(prog: Program, lm: Any) -> Any:
    settings: dict[str, Any] = {"lm": prog.lm or lm, "track_usage": True}
    if prog.adapter is not None:
        settings["adapter"] = prog.adapter
    return dspy.context(**settings)


def run_program(prog: Program, inputs: dict[str, Any], lm: Any) -> dict[str, Any]:
    """Run once: ``{"outputs", "usage", "execution_time"}``."""
    kwargs = _inputs(prog, inputs)
    t0 = time.perf_counter()
    with _context(prog, lm):
        pred = prog.module(**kwargs)
    return {
        "outputs": outputs_of(pred),
        "usage": usage_of(pred),
        "execution_time": time.perf_counter() - t0,
    }


def _listeners(prog: Program) -> list[Any]:
    from dspy.streaming import StreamListener

    out = []
    for name, predictor in prog.module.named_predictors():
        for field_name in predictor.signature.output_fields:
            out.append(
                StreamListener(
                    signature_field_name=field_name,
                    predict=predictor,
                    predict_name=name,
                    allow_reuse=True,
                )
            )
    return out


def stream_program(
    prog: Program, inputs: dict[str, Any], lm: Any, cancelled: Callable[[], bool]
) -> Generator[dict[str, Any], None, dict[str, Any]]:
    """Yield ``{"field", "delta", "predictor"}`` chunks as the LM produces them; return the
    same result :func:`run_program` would. Stops at the next chunk once ``cancelled()``."""
    from dspy.streaming import StreamResponse

    kwargs = _inputs(prog, inputs)
    t0 = time.perf_counter()
    streaming = dspy.streamify(
        prog.module, stream_listeners=_listeners(prog), async_streaming=False
    )
    final: Any = None
    with _context(prog, lm):
        gen = streaming(**kwargs)
        try:
            for item in gen:
                if cancelled():
                    break
                if isinstance(item, StreamResponse):
                    if item.chunk:
                        yield {
                            "field": item.signature_field_name,
                            "delta": item.chunk,
                            "predictor": item.predict_name,
                        }
                elif isinstance(item, dspy.Prediction):
                    final = item
        finally:
            gen.close()
    return {
        "outputs": outputs_of(final) if final is not None else {},
        "usage": usage_of(final),
        "execution_time": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- files
def save_file(prog: Program, path: Any) -> dict[str, Any]:
    """Write ``{format, version, config (no secrets), state}`` as JSON to ``path``."""
    if not isinstance(path, str) or not path:
        raise InvalidRequestError("save_program needs 'path', the file to write")
    target = Path(path).expanduser()
    data = {
        "format": SAVE_FORMAT,
        "version": 1,
        "config": redacted_config(prog.config),
        "state": prog.dump_state(),
        "saved_at": time.time(),
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, indent=2, default=str)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError(f"cannot write {str(target)!r}: {exc}") from exc
    return {"path": str(target), "bytes": len(text.encode())}


def load_file(path: Any) -> tuple[dict[str, Any], Any]:
    """Read a file written by :func:`save_file`: ``(config, state)``."""
    if not isinstance(path, str) or not path:
        raise InvalidRequestError("load_program needs 'path', a file written by save_program")
    source = Path(path).expanduser()
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidConfigurationError(f"cannot read program file {str(source)!r}: {exc}") from exc
    except ValueError as exc:
        raise InvalidConfigurationError(f"{str(source)!r} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
        raise InvalidConfigurationError(
            f"{str(source)!r} is not a program saved by mlbridge's save_program "
            f"(format {SAVE_FORMAT!r})"
        )
    config = data.get("config")
    if not isinstance(config, dict):
        raise InvalidConfigurationError(f"{str(source)!r} has no program config")
    lm = config.get("lm")
    if isinstance(lm, dict):
        config = {**config, "lm": {k: v for k, v in lm.items() if k != "api_key_set"}}
    return config, data.get("state")
