"""The built-in bridges: name -> worker class path. The one list, shared by the host (which must
not import the worker runtime) and the worker runtime (which must not import the host)."""

from __future__ import annotations

from types import MappingProxyType

__all__ = ["BUILTIN_BRIDGES"]

BUILTIN_BRIDGES: MappingProxyType[str, str] = MappingProxyType(
    {
        "echo": "mlbridge.bridges.echo:EchoBridge",
        "transformers": "mlbridge.bridges.transformers:TransformersBridge",
        "dspy": "mlbridge.bridges.dspy:DSPyBridge",
        "langchain": "mlbridge.bridges.langchain:LangChainBridge",
        "sandbox": "mlbridge.bridges.sandbox:SandboxBridge",
    }
)
