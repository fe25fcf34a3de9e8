"""Chat model specs for the LangChain bridge: plain data -> a ``BaseChatModel``.

A spec is plain data, so the host can record it with a chain and rebuild the chain anywhere:

* ``{"provider": "openai" | "anthropic" | ..., "model", "base_url"?, "api_key"?,
  "api_key_env"?, "temperature"?, "max_tokens"?, "timeout"?, "kwargs"?}``: any chat model whose
  LangChain integration package is installed, built with ``langchain.chat_models.init_chat_model``
  (a missing package is an error naming the package to install). ``api_key`` may come from the
  config, from the variable named by ``api_key_env``, or from the provider's usual variable
  (``OPENAI_API_KEY``...), which the integration reads itself.
* ``{"class": "pkg.mod:Class", "kwargs": {...}}``: any ``BaseChatModel`` subclass (LangChain's
  fake models in tests).
* ``{"provider": "mlbridge", "model": "local:smollm2", "bridge"?: "transformers"}``, also what
  ``None`` (no ``llm``) means: mlbridge's local chat model, served by the Transformers pool through
  a call back to the host (:class:`~._langchain_host_model.HostChatModel`). ``model`` may be
  anything that bridge's ``chat`` accepts (a built-in name, a local path).

Building a model never calls it. API keys are never logged or returned: :func:`public_spec` is
what replies and statistics show.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..errors import InvalidConfigurationError
from ._imports import import_object

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "build_model",
    "import_object",
    "normalize_model_spec",
    "public_spec",
]

DEFAULT_LOCAL_MODEL = "local:smollm2"
LOCAL_PROVIDER = "mlbridge"
_SPEC_KEYS = frozenset(
    {
        "provider",
        "model",
        "base_url",
        "api_key",
        "api_key_env",
        "temperature",
        "max_tokens",
        "timeout",
        "kwargs",
        "class",
        "bridge",
    }
)
HostGetter = Callable[[], Any]


def _bad(message: str) -> InvalidConfigurationError:
    return InvalidConfigurationError(message)


def normalize_model_spec(raw: Any, *, where: str = "llm") -> dict[str, Any]:
    """Validate a model spec and return its canonical copy (``None`` -> the local model)."""
    if raw is None:
        return {"provider": LOCAL_PROVIDER, "model": DEFAULT_LOCAL_MODEL}
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict):
        raise _bad(
            f"{where} must be an object such as {{'provider': 'openai', 'model': 'gpt-4o-mini'}} "
            f"or {{'class': 'pkg.mod:ChatModel', 'kwargs': {{...}}}}, got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise _bad(
            f"{where}: unknown keys {unknown}; use provider, model, base_url, api_key, "
            "api_key_env, temperature, max_tokens, timeout, kwargs (or class + kwargs)"
        )
    spec = {k: v for k, v in raw.items() if v is not None}
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise _bad(f"{where}.kwargs must be an object of keyword arguments")
    if "class" in spec:
        if not isinstance(spec["class"], str):
            raise _bad(f"{where}.class must be an import path such as 'pkg.mod:MyChatModel'")
        return spec
    model = spec.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise _bad(f"{where}.model must be a non-empty string, got {model!r}")
    provider = spec.get("provider")
    if provider is None:
        if model is None or model.startswith("local"):
            provider = LOCAL_PROVIDER
        elif ":" in model:  # init_chat_model's "provider:model" form
            provider, _, spec["model"] = model.partition(":")
        else:
            raise _bad(
                f"{where}: 'provider' is required for model {model!r} (e.g. 'openai', "
                "'anthropic'), or use {'class': 'pkg.mod:ChatModel'}"
            )
    if not isinstance(provider, str) or not provider:
        raise _bad(f"{where}.provider must be a string such as 'openai', got {provider!r}")
    spec["provider"] = provider
    if provider == LOCAL_PROVIDER:
        spec.setdefault("model", DEFAULT_LOCAL_MODEL)
        if spec["model"] == "local":
            spec["model"] = DEFAULT_LOCAL_MODEL
    elif "model" not in spec:
        raise _bad(f"{where}.model is required for provider {provider!r}")
    temp = spec.get("temperature")
    if temp is not None and (isinstance(temp, bool) or not isinstance(temp, int | float)):
        raise _bad(f"{where}.temperature must be a number, got {temp!r}")
    for key in ("max_tokens",):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _bad(f"{where}.{key} must be an integer, got {value!r}")
    timeout = spec.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
        raise _bad(f"{where}.timeout must be a number of seconds, got {timeout!r}")
    return spec


def public_spec(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec with every secret removed (safe for replies, statistics and logs)."""
    from .._redact import is_secret_key

    if spec is None:
        return None
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if is_secret_key(key):
            out["api_key_set"] = True
        elif isinstance(value, dict):
            kept = {k: v for k, v in value.items() if not is_secret_key(k)}
            if len(kept) != len(value):
                out["api_key_set"] = True
            out[key] = kept
        else:
            out[key] = value
    return out


def build_model(spec: dict[str, Any], host: HostGetter) -> Any:
    """A ready ``BaseChatModel`` for ``spec`` (already normalised). Makes no call to the model."""
    from langchain_core.language_models import BaseChatModel

    if "class" in spec:
        cls = import_object(spec["class"], "llm.class")
        if not (isinstance(cls, type) and issubclass(cls, BaseChatModel)):
            raise _bad(
                f"llm.class {spec['class']!r} is not a langchain_core BaseChatModel subclass"
            )
        try:
            return cls(**spec.get("kwargs", {}))
        except Exception as exc:
            raise _bad(
                f"llm.class {spec['class']!r} could not be built: {type(exc).__name__}: {exc}"
            ) from exc
    if spec["provider"] == LOCAL_PROVIDER:
        from ._langchain_host_model import HostChatModel

        model = HostChatModel(
            model=spec["model"],
            bridge=str(spec.get("bridge", "transformers")),
            temperature=spec.get("temperature", 0.0),
            max_tokens=spec.get("max_tokens", 128),
            timeout=float(spec.get("timeout", 600.0)),
            **spec.get("kwargs", {}),
        )
        model.set_host(host)
        return model
    return _provider_model(spec)


def _provider_model(spec: dict[str, Any]) -> Any:
    try:
        from langchain.chat_models import init_chat_model
    except ImportError as exc:
        raise _bad(
            "provider model specs are built with langchain.chat_models.init_chat_model: install "
            "the 'langchain' package in the langchain bridge's interpreter, or use "
            f"{{'class': 'pkg.mod:ChatModel'}} ({exc})"
        ) from exc

    provider, model = spec["provider"], spec["model"]
    kwargs: dict[str, Any] = dict(spec.get("kwargs", {}))
    api_key = spec.get("api_key")
    if api_key is None and spec.get("api_key_env"):
        api_key = os.environ.get(str(spec["api_key_env"]))
        if not api_key:
            raise _bad(f"llm.api_key_env: the variable {spec['api_key_env']!r} is not set")
    if api_key is not None:
        kwargs["api_key"] = api_key
    for key in ("base_url", "temperature", "max_tokens", "timeout"):
        if key in spec:
            kwargs[key] = spec[key]
    try:
        return init_chat_model(model, model_provider=provider, **kwargs)
    except ImportError as exc:
        raise _bad(
            f"llm provider {provider!r} needs its LangChain integration package in the "
            f"langchain bridge's interpreter: {exc}"
        ) from exc
    except Exception as exc:
        text = str(exc)
        if api_key:
            text = text.replace(str(api_key), "***")
        raise _bad(
            f"llm {provider}:{model} could not be built: {type(exc).__name__}: {text}"
        ) from None
