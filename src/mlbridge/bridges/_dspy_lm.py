"""Language models for the DSPy bridge: specs -> ``dspy.BaseLM`` objects, and the local default.

An LM *spec* is plain data, so the host can record it and replay it to every worker:

* ``{"model": "openai/gpt-4o-mini", "api_key"?, "api_key_env"?, "api_base"?, "temperature"?,
  "max_tokens"?, "cache"?, "model_type"?, "num_retries"?, "kwargs"?}``: a ``dspy.LM`` (any provider
  string DSPy/LiteLLM accepts; an OpenAI-compatible server with ``api_base``). The old DSPex form
  ``{"model": "gemini-1.5-flash", "provider": "google"}`` becomes ``gemini/gemini-1.5-flash``.
* ``{"class": "pkg.mod:Class", "kwargs": {...}}``: any ``dspy.BaseLM`` subclass, e.g.
  ``dspy.utils.dummies:DummyLM`` with ``{"answers": [...]}``.
* ``{"model": "local:smollm2"}`` (also the default when nothing is configured): mlbridge's local
  chat model, served by the Transformers pool through a call back to the host
  (:class:`HostLM`), so DSPy workers share one model copy and need no network.

Building an LM never calls it (no live test call). API keys are never logged or returned:
:func:`public_spec` is what replies and statistics show.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import dspy
from dspy.lm15 import (
    Message,
    Response,
    StreamDeltaEvent,
    StreamEndEvent,
    StreamStartEvent,
    TextDelta,
    TextPart,
    Usage,
)

from ..errors import CallbackError, InvalidConfigurationError, ModelError
from ._imports import import_object

__all__ = [
    "LOCAL_MODELS",
    "HostChatEngine",
    "HostLM",
    "LocalChatAdapter",
    "build_lm",
    "import_object",
    "is_local",
    "normalize_spec",
    "public_spec",
]

LOCAL_MODELS = {"local", "local:smollm2"}
DEFAULT_LOCAL_MODEL = "local:smollm2"
# DSPy's chat format ends each answer with this marker: generation can stop there.
_COMPLETED = "[[ ## completed ## ]]"
_PROVIDER_ALIASES = {"google": "gemini", "gemini": "gemini"}
_SECRET_KEYS = frozenset({"api_key", "token", "secret", "password", "authorization"})
_LM_KEYS = frozenset(
    {
        "model",
        "provider",
        "api_key",
        "api_key_env",
        "api_base",
        "base_url",
        "temperature",
        "max_tokens",
        "cache",
        "model_type",
        "num_retries",
        "kwargs",
        "class",
        "bridge",
        "timeout",
    }
)
HostGetter = Callable[[], Any]


def _bad(message: str) -> InvalidConfigurationError:
    return InvalidConfigurationError(message)


def is_local(spec: dict[str, Any] | None) -> bool:
    return spec is None or (spec.get("class") is None and spec.get("model") in LOCAL_MODELS)


def normalize_spec(raw: Any, *, where: str = "lm") -> dict[str, Any]:
    """Validate an LM spec and return its canonical copy (provider folded into the model)."""
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict):
        raise _bad(f"{where} must be an object such as {{'model': 'openai/gpt-4o-mini'}}")
    unknown = sorted(set(raw) - _LM_KEYS)
    if unknown:
        raise _bad(
            f"{where}: unknown keys {unknown}; use model, api_key, api_base, temperature, "
            "max_tokens, cache, kwargs (or class + kwargs for a dspy.BaseLM subclass)"
        )
    spec = {k: v for k, v in raw.items() if v is not None}
    if "class" in spec:
        if not isinstance(spec["class"], str):
            raise _bad(f"{where}.class must be an import path such as 'pkg.mod:MyLM'")
    else:
        model = spec.get("model")
        if not isinstance(model, str) or not model.strip():
            raise _bad(
                f"{where}.model is required: a provider string such as 'openai/gpt-4o-mini', "
                "'gemini/gemini-2.0-flash', or 'local:smollm2' for the local model"
            )
        provider = spec.pop("provider", None)
        if provider is not None and "/" not in model and model not in LOCAL_MODELS:
            if not isinstance(provider, str) or not provider:
                raise _bad(f"{where}.provider must be a string such as 'openai'")
            spec["model"] = f"{_PROVIDER_ALIASES.get(provider, provider)}/{model}"
        spec["provider"] = provider if provider is not None else _provider_of(spec["model"])
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise _bad(f"{where}.kwargs must be an object")
    for key in ("temperature",):
        if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], int | float)):
            raise _bad(f"{where}.{key} must be a number, got {spec[key]!r}")
    for key in ("max_tokens", "num_retries"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _bad(f"{where}.{key} must be an integer, got {value!r}")
    if "cache" in spec and not isinstance(spec["cache"], bool):
        raise _bad(f"{where}.cache must be true or false")
    return spec


def _provider_of(model: str) -> str:
    if model in LOCAL_MODELS:
        return "mlbridge"
    return model.split("/", 1)[0] if "/" in model else "openai"


def public_spec(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec with every secret removed (safe for replies, statistics and logs)."""
    if spec is None:
        return None
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if key.lower() in _SECRET_KEYS:
            out["api_key_set"] = True
        elif isinstance(value, dict):
            kept = {k: v for k, v in value.items() if k.lower() not in _SECRET_KEYS}
            if len(kept) != len(value):
                out["api_key_set"] = True
            out[key] = kept
        else:
            out[key] = value
    return out


def build_lm(spec: dict[str, Any], host: HostGetter, callbacks: Sequence[Any] = ()) -> Any:
    """A ready ``dspy.BaseLM`` for ``spec`` (already normalised). Makes no call to the model.

    ``callbacks`` (DSPy callbacks) are attached to the LM itself, so only its calls pay for them.
    """
    lm = _build_lm(spec, host)
    lm.callbacks = [*(getattr(lm, "callbacks", None) or []), *callbacks]
    return lm


def _build_lm(spec: dict[str, Any], host: HostGetter) -> Any:
    if "class" in spec:
        cls = import_object(spec["class"], "lm.class")
        if not (isinstance(cls, type) and issubclass(cls, dspy.BaseLM)):
            raise _bad(f"lm.class {spec['class']!r} is not a dspy.BaseLM subclass")
        try:
            return cls(**spec.get("kwargs", {}))
        except Exception as exc:
            raise _bad(f"lm.class {spec['class']!r} could not be built: {exc}") from exc
    model = spec["model"]
    if model in LOCAL_MODELS:
        return HostLM(
            host,
            model=DEFAULT_LOCAL_MODEL if model == "local" else model,
            bridge=str(spec.get("bridge", "transformers")),
            temperature=spec.get("temperature", 0.0),
            max_tokens=spec.get("max_tokens", 128),
            timeout=float(spec.get("timeout", 600.0)),
        )
    kwargs: dict[str, Any] = dict(spec.get("kwargs", {}))
    api_key = spec.get("api_key")
    if api_key is None and spec.get("api_key_env"):
        api_key = os.environ.get(str(spec["api_key_env"]))
        if api_key is None:
            raise _bad(f"lm.api_key_env: the variable {spec['api_key_env']!r} is not set")
    if api_key is not None:
        kwargs["api_key"] = api_key
    base = spec.get("api_base") or spec.get("base_url")
    if base is not None:
        kwargs["api_base"] = base
    for key in ("temperature", "max_tokens", "cache", "model_type", "num_retries", "timeout"):
        if key in spec:
            kwargs[key] = spec[key]
    try:
        return dspy.LM(model, **kwargs)
    except (ValueError, TypeError) as exc:
        raise _bad(f"lm {model!r}: {exc}") from exc
    except Exception as exc:  # DSPy's own configuration errors (LMConfigurationError...)
        raise _bad(f"lm {model!r}: {exc}") from exc


# --------------------------------------------------------------------------- the local model
def _chat_messages(request: Any) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    system = request.system
    if system is not None:
        text = (
            system if isinstance(system, str) else "".join(getattr(p, "text", "") for p in system)
        )
        messages.append({"role": "system", "content": text})
    for m in request.messages:
        role = "user" if m.role in ("developer", "tool") else m.role
        messages.append({"role": role, "content": m.text or ""})
    return messages


def _usage(result: dict[str, Any]) -> Any:
    u = result.get("usage") or {}
    return Usage(
        input_tokens=u.get("prompt_tokens"),
        output_tokens=u.get("completion_tokens"),
        total_tokens=u.get("total_tokens"),
    )


def _finish(reason: Any) -> str:
    return reason if reason in ("stop", "length") else "stop"


class HostChatEngine:
    """A DSPy engine that answers through ``<bridge>:chat`` on the host (a call-back).

    ``complete`` makes one blocking call; ``stream`` uses the streamed form and turns its
    ``{"delta": text}`` chunks into DSPy stream events, so ``dspy.streamify`` listeners see the
    local model's tokens as they are generated.
    """

    def __init__(
        self, host: HostGetter, *, model: str, bridge: str, timeout: float, defaults: dict[str, Any]
    ) -> None:
        self._host = host
        self.model = model
        self.bridge = bridge
        self.timeout = timeout
        self.defaults = defaults

    def _client(self) -> Any:
        client = self._host()
        if client is None or not client.available:
            raise CallbackError(
                f"the local model {self.model!r} is served by the {self.bridge!r} pool through "
                "the mlbridge host, and this worker has no host to call (a v1/DSPex host or a "
                "standalone worker): configure an LM with configure_lm, or run it under mlbridge"
            )
        return client

    def _args(self, request: Any) -> dict[str, Any]:
        cfg = request.config
        args: dict[str, Any] = {"model": self.model, "messages": _chat_messages(request)}
        max_tokens = (
            cfg.max_tokens if cfg.max_tokens is not None else self.defaults.get("max_tokens")
        )
        if max_tokens is not None:
            args["max_tokens"] = max_tokens
        temperature = cfg.temperature
        if temperature is None:
            temperature = self.defaults.get("temperature")
        if temperature is not None:
            args["temperature"] = temperature
        if cfg.top_p is not None:
            args["top_p"] = cfg.top_p
        args["stop"] = list(cfg.stop) if cfg.stop else [_COMPLETED]
        if cfg.seed is not None:
            args["seed"] = cfg.seed
        return args

    def complete(self, request: Any) -> Any:
        result = self._client().call(self.bridge, "chat", self._args(request), timeout=self.timeout)
        if not isinstance(result, dict):
            raise ModelError(f"{self.bridge}:chat returned {type(result).__name__}, not a reply")
        text = (result.get("message") or {}).get("content") or result.get("text") or ""
        return Response(
            id=None,
            model=self.model,
            message=Message.assistant([TextPart(text)]),
            finish_reason=_finish(result.get("finish_reason")),
            usage=_usage(result),
        )

    def stream(self, request: Any) -> Iterator[Any]:
        chunks = self._client().stream(
            self.bridge, "chat", self._args(request), timeout=self.timeout
        )
        yield StreamStartEvent(id=None, model=self.model)
        final: Any = None
        while True:
            try:
                chunk = next(chunks)
            except StopIteration as stop:
                final = stop.value
                break
            delta = chunk.get("delta") if isinstance(chunk, dict) else None
            if delta:
                yield StreamDeltaEvent(delta=TextDelta(text=delta))
        final = final if isinstance(final, dict) else {}
        yield StreamEndEvent(finish_reason=_finish(final.get("finish_reason")), usage=_usage(final))

    def close(self) -> None:
        pass


class LocalChatAdapter(dspy.ChatAdapter):  # type: ignore[misc]
    """DSPy's ChatAdapter for the small local model, which often answers in plain prose.

    When the reply does not parse and the signature has a single text output, the whole reply is
    that field (instead of a parse error and a second, JSON, attempt). Anything else parses
    exactly as with ChatAdapter. Used only with :class:`HostLM` when the program chose no
    adapter. A few demos (e.g. ``labeled_few_shot``) make the model follow DSPy's format.
    """

    def __init__(self) -> None:
        super().__init__(use_json_adapter_fallback=False)

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        try:
            return dict(super().parse(signature, completion))
        except Exception:
            outputs = signature.output_fields
            if len(outputs) == 1:
                ((name, field),) = outputs.items()
                if field.annotation is str:
                    return {name: completion.strip()}
            raise


class HostLM(dspy.LM):  # type: ignore[misc]  # dspy ships no type information
    """mlbridge's local chat model as a ``dspy.BaseLM``: generation runs in the Transformers pool.

    Defaults to greedy decoding (temperature 0) and 128 new tokens, stopping at DSPy's
    ``[[ ## completed ## ]]`` marker. Responses are not cached by DSPy (the model is local and
    deterministic; the host's pool is the shared copy).
    """

    def __init__(
        self,
        host: HostGetter,
        *,
        model: str = DEFAULT_LOCAL_MODEL,
        bridge: str = "transformers",
        temperature: float | None = 0.0,
        max_tokens: int | None = 128,
        timeout: float = 600.0,
    ) -> None:
        engine = HostChatEngine(
            host,
            model=model,
            bridge=bridge,
            timeout=timeout,
            defaults={"temperature": temperature, "max_tokens": max_tokens},
        )
        super().__init__(
            model,
            temperature=temperature,
            max_tokens=max_tokens,
            cache=False,
            num_retries=0,
            engine=engine,
        )
