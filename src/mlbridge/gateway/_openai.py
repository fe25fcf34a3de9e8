"""OpenAI-compatible ``/v1/models``, ``/v1/chat/completions`` and ``/v1/embeddings``.

Backed by the bridge named by ``[gateway] openai_bridge`` (default ``transformers``) through its
commands ``chat``, ``embed`` and ``list_models``; ``model`` is a built-in name
(``local:smollm2``, ``local:minilm``), a model resource id the user created on that bridge, a
local path or a cached hub id. Chat takes ``stream``, ``stream_options.include_usage``, ``stop``,
``seed``, ``temperature``, ``top_p``, ``max_tokens`` and ``max_completion_tokens`` (which wins).
Streams are Server-Sent Events of ``chat.completion.chunk`` objects ending in ``data: [DONE]``;
with ``include_usage`` a last chunk with empty ``choices`` carries ``usage``. Embeddings come as
float lists, or as base64 float32 with ``encoding_format: "base64"`` (what the ``openai`` client
asks for by default). Errors use OpenAI's shape (see :mod:`._errors`).
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from mlbridge._api import AsyncMLBridge
from mlbridge._config_gateway import GatewaySettings

from ._encode import jsonable, render
from ._errors import HTTPError
from ._rest import _call, _error_events
from ._sse import event, prefetch, sse_response

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["openai"])

_MODEL_TYPES = ("model", "embedder", "pipeline")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=500)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    n: int | None = Field(None, ge=1, le=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=500)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


def _ctx(request: Request) -> tuple[AsyncMLBridge, str]:
    bridge: AsyncMLBridge = request.app.state.bridge
    settings: GatewaySettings = request.app.state.settings
    name = settings.openai_bridge
    if name not in bridge.list_frameworks():
        raise HTTPError(
            404,
            f"the /v1 endpoints need the bridge {name!r}, which is not configured. Fix: add "
            f"[bridges.{name}] to mlbridge.toml (the transformers bridge serves local:smollm2 "
            "and local:minilm), or point [gateway] openai_bridge at a bridge with chat and "
            "embed commands",
            code="model_not_found",
            param="model",
        )
    return bridge, name


def _chat_args(body: ChatCompletionRequest) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": body.model,
        "messages": [m.model_dump(exclude_none=True) for m in body.messages],
    }
    for key in (
        "stop",
        "seed",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
    ):
        value = getattr(body, key)
        if value is not None:
            args[key] = value
    return args


def _usage(result: Any) -> dict[str, int]:
    u = result.get("usage") if isinstance(result, dict) else None
    u = u if isinstance(u, dict) else {}
    p, c = int(u.get("prompt_tokens", 0) or 0), int(u.get("completion_tokens", 0) or 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _content(result: Any) -> str:
    if isinstance(result, dict):
        msg = result.get("message")
        if isinstance(msg, dict) and isinstance(msg.get("content"), str):
            return str(msg["content"])
        if isinstance(result.get("text"), str):
            return str(result["text"])
    return "" if result is None else str(result)


@router.get("/models", summary="The models /v1 can use (OpenAI list shape)")
async def list_models(request: Request) -> dict[str, Any]:
    bridge: AsyncMLBridge = request.app.state.bridge
    name = request.app.state.settings.openai_bridge
    data: list[dict[str, Any]] = []
    if name in bridge.list_frameworks():
        listed = await _call(bridge.execute(name, "list_models"))
        builtin = listed.get("builtin", []) if isinstance(listed, dict) else []
        for m in builtin:
            if isinstance(m, dict) and m.get("available", True) and m.get("id"):
                data.append(_model_entry(str(m["id"]), m.get("kind")))
        for r in await _call(bridge.list_resources(name)):
            if r.get("type") in _MODEL_TYPES:
                data.append(_model_entry(str(r.get("id") or r.get("resource_id")), r.get("type")))
    return {"object": "list", "data": data}


def _model_entry(model_id: str, kind: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "mlbridge",
        "kind": kind,
    }


@router.post(
    "/chat/completions",
    summary="Chat completion (stream: Server-Sent Events of chat.completion.chunk)",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    bridge, name = _ctx(request)
    args = _chat_args(body)
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.stream:
        result = await _call(bridge.execute(name, "chat", args))
        reason = result.get("finish_reason", "stop") if isinstance(result, dict) else "stop"
        return render(
            request,
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _content(result)},
                        "logprobs": None,
                        "finish_reason": reason or "stop",
                    }
                ],
                "usage": _usage(result),
            },
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    stream = bridge.stream(name, "chat", args)
    first = await _call(prefetch(stream))
    sent_role = [False]

    def chunk(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
        }
        if include_usage:
            out["usage"] = None
        return out

    def role() -> list[bytes]:
        if sent_role[0]:
            return []
        sent_role[0] = True
        return [event(chunk({"role": "assistant", "content": ""}, None))]

    def on_chunk(c: Any) -> list[bytes]:
        text = c.get("delta") if isinstance(c, dict) else None
        if not isinstance(text, str) or not text:
            return []  # progress while the model loads
        return [*role(), event(chunk({"content": text}, None))]

    def on_end(result: Any) -> list[bytes]:
        reason = result.get("finish_reason", "stop") if isinstance(result, dict) else "stop"
        out = [*role(), event(chunk({}, reason or "stop"))]
        if include_usage:
            out.append(
                event(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": _usage(result),
                    }
                )
            )
        out.append(b"data: [DONE]\n\n")
        return out

    errors = _error_events(request)

    def on_error(exc: HTTPError) -> list[bytes]:
        # OpenAI streams carry an error as a data line with an "error" object
        return [piece.split(b"\n", 1)[1] for piece in errors(exc)]

    return sse_response(stream, first, on_chunk=on_chunk, on_end=on_end, on_error=on_error)


def _b64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@router.post("/embeddings", summary="Embeddings (float lists, or base64 float32)")
async def embeddings(
    request: Request, body: Annotated[EmbeddingRequest, "OpenAI embeddings request"]
) -> Response:
    bridge, name = _ctx(request)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if any(not isinstance(t, str) for t in texts):
        raise HTTPError(
            400,
            "'input' as token ids is not supported here. Fix: send the text (a string or a "
            "list of strings)",
            code="invalid_request",
            param="input",
        )
    if not texts:
        raise HTTPError(
            400,
            "'input' is empty. Fix: send a string or a non-empty list of strings",
            code="invalid_request",
            param="input",
        )
    result = await _call(
        bridge.execute(name, "embed", {"model": body.model, "texts": texts, "as_list": True})
    )
    vectors = jsonable(result.get("embeddings", []) if isinstance(result, dict) else [])
    if body.dimensions is not None:
        vectors = [v[: body.dimensions] for v in vectors]
    tokens = int(result.get("tokens", 0) or 0) if isinstance(result, dict) else 0
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _b64(v) if body.encoding_format == "base64" else v,
        }
        for i, v in enumerate(vectors)
    ]
    return render(
        request,
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
    )
